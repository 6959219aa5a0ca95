// lmforge console: sign in with an API key (playground, usage) or the admin token (tenants, keys, usage).
//
// Plain JS, no build step, no third-party code: the page is served with `script-src 'self'`. Everything the
// server sends is written with textContent or DOM attributes, never parsed as HTML. The credential lives in
// sessionStorage (this tab only, gone when it closes) and travels only in the Authorization header.
"use strict";

(() => {
  const STORAGE_KEY = "lmforge.console.session";
  const NUMBER = new Intl.NumberFormat("en-US");
  const SVG_NS = "http://www.w3.org/2000/svg";

  const $ = (id) => document.getElementById(id);

  let session = null; // {token, role: "key" | "admin", label}
  let chatController = null; // the AbortController of the running chat request
  let conversation = []; // the messages sent with each chat request
  let modelsLoaded = false;

  // --- small DOM helpers ----------------------------------------------------------------------------------

  /** An element with attributes (strings only; `text` = its textContent, `class` = className) and children. */
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "text") node.textContent = String(value);
      else if (name === "class") node.className = value;
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) node.append(child instanceof Node ? child : String(child));
    return node;
  }

  function svg(tag, attrs = {}, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  function showError(node, message) {
    node.textContent = message || "";
    node.hidden = !message;
  }

  const fmtInt = (n) => NUMBER.format(Number(n) || 0);
  const fmtUsd = (s) => (s === null || s === undefined ? "—" : String(s));

  /** "2026-11-03 14:02:11" from an ISO time (shown in UTC, as the server stores it). */
  function fmtTime(iso) {
    if (!iso) return "—";
    const t = new Date(iso);
    return Number.isNaN(t.getTime()) ? String(iso) : t.toISOString().replace("T", " ").slice(0, 19);
  }

  function thisMonth() {
    return new Date().toISOString().slice(0, 7);
  }

  // --- the API ------------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(message, status, code) {
      super(message);
      this.name = "ApiError";
      this.status = status;
      this.code = code;
    }
  }

  /** The server's own message from an OpenAI-shaped error body, or the HTTP status. */
  async function errorOf(response) {
    let message = `The server answered ${response.status} ${response.statusText}`.trim();
    let code = null;
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) {
        message = String(body.error.message);
        code = body.error.code || null;
      }
    } catch (_) {
      // not JSON: keep the status line
    }
    return new ApiError(message, response.status, code);
  }

  async function request(path, { token = session && session.token, method = "GET", body, signal } = {}) {
    const headers = { Authorization: `Bearer ${token}`, Accept: "application/json" };
    const init = { method, headers, signal, cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ApiError(`Could not reach the server (${e.message}).`, 0, null);
    }
    if (!response.ok) {
      const error = await errorOf(response);
      // the stored credential stopped working (revoked, expired, server restarted with another admin token)
      if (session && token === session.token && isCredentialError(error)) signOut(error.message);
      throw error;
    }
    return response;
  }

  function isCredentialError(error) {
    return error.status === 401 || error.code === "key_revoked" || error.code === "key_expired";
  }

  const getJson = async (path, options) => (await request(path, options)).json();

  // --- sign in and out ----------------------------------------------------------------------------------

  /** Which kind of credential `token` is: an API key opens /v1, the admin token opens /admin/v1. */
  async function identify(token) {
    try {
      await request("/v1/models", { token });
      return "key";
    } catch (keyError) {
      if (keyError.status !== 401) throw keyError; // revoked, expired, unreachable: say so
      try {
        await request("/admin/v1/tenants", { token });
        return "admin";
      } catch (_) {
        throw keyError; // the message a key user needs ("Incorrect API key provided: ...")
      }
    }
  }

  async function onSignIn(event) {
    event.preventDefault();
    const input = $("signin-key");
    const token = input.value.trim();
    const error = $("signin-error");
    showError(error, "");
    if (!token) return;
    $("signin-submit").disabled = true;
    try {
      const role = await identify(token);
      const label = role === "admin" ? "admin" : `key ${token.slice(0, 12)}…`;
      startSession({ token, role, label });
      input.value = "";
    } catch (e) {
      showError(error, e.message);
    } finally {
      $("signin-submit").disabled = false;
    }
  }

  function startSession(s) {
    session = s;
    sessionStorage.setItem(STORAGE_KEY, JSON.stringify(s));
    $("who").textContent = `Signed in with ${s.label}`;
    $("nav").hidden = false;
    $("sign-out").hidden = false;
    $("tab-playground").hidden = s.role !== "key";
    $("tab-admin").hidden = s.role !== "admin";
    $("usage-tenant-wrap").hidden = s.role !== "admin";
    const wanted = location.hash.slice(1);
    route(allowedViews().includes(wanted) ? wanted : allowedViews()[0]);
  }

  function allowedViews() {
    if (!session) return ["signin"];
    return session.role === "admin" ? ["admin", "usage"] : ["playground", "usage"];
  }

  /** Forget the credential and everything shown with it; `message` explains why, when it was not asked for. */
  function signOut(message) {
    if (chatController) chatController.abort();
    session = null;
    sessionStorage.removeItem(STORAGE_KEY);
    conversation = [];
    modelsLoaded = false;
    $("transcript").replaceChildren();
    $("chat-model").replaceChildren();
    $("chat-status").textContent = "";
    for (const id of ["usage-models", "usage-recent", "tenants", "keys"]) {
      for (const part of $(id).querySelectorAll("tbody, tfoot")) part.replaceChildren();
    }
    $("usage-summary").replaceChildren();
    $("usage-chart").replaceChildren();
    $("usage-tenant").replaceChildren();
    $("key-tenant").replaceChildren();
    hideSecret();
    for (const id of ["usage-error", "admin-error"]) showError($(id), "");
    $("who").textContent = "";
    $("nav").hidden = true;
    $("sign-out").hidden = true;
    showError($("signin-error"), typeof message === "string" ? message : "");
    if (location.hash) window.history.replaceState(null, "", location.pathname);
    show("signin");
    $("signin-key").focus();
  }

  // --- views --------------------------------------------------------------------------------------------

  function show(view) {
    for (const section of document.querySelectorAll("section.view")) {
      section.hidden = section.id !== `view-${view}`;
    }
    for (const tab of document.querySelectorAll("nav .tab")) {
      if (tab.dataset.view === view) tab.setAttribute("aria-current", "page");
      else tab.removeAttribute("aria-current");
    }
  }

  function route(view) {
    if (!allowedViews().includes(view)) view = allowedViews()[0];
    if (session && location.hash !== `#${view}`) window.history.replaceState(null, "", `#${view}`);
    show(view);
    if (view === "playground") loadModels();
    else if (view === "usage") loadUsage();
    else if (view === "admin") loadAdmin();
  }

  // --- playground ---------------------------------------------------------------------------------------

  async function loadModels() {
    if (modelsLoaded) return;
    const status = $("chat-status");
    try {
      const list = await getJson("/v1/models");
      const select = $("chat-model");
      select.replaceChildren(...list.data.map((m) => el("option", { value: m.id, text: m.id })));
      modelsLoaded = true;
      status.textContent = "";
    } catch (e) {
      status.textContent = `Could not list the models: ${e.message}`;
    }
  }

  function addMessage(role, text) {
    const content = el("div", { class: "content", text });
    const meta = el("div", { class: "meta" });
    const item = el(
      "li",
      { class: `message ${role}` },
      el("div", { class: "role", text: role === "user" ? "You" : "Assistant" }),
      content,
      meta,
    );
    $("transcript").append(item);
    item.scrollIntoView({ block: "end" });
    return { item, content, meta };
  }

  /** The `data:` payloads of a text/event-stream body, one string per event, as they arrive. */
  async function* sseData(body) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let data = [];
    let done = false;
    try {
      for (;;) {
        const chunk = await reader.read();
        if (chunk.done) break;
        buffer += decoder.decode(chunk.value, { stream: true });
        let newline;
        while ((newline = buffer.indexOf("\n")) >= 0) {
          let line = buffer.slice(0, newline);
          buffer = buffer.slice(newline + 1);
          if (line.endsWith("\r")) line = line.slice(0, -1);
          if (line === "") {
            // a blank line ends an event
            if (data.length) yield data.join("\n");
            data = [];
          } else if (line.startsWith("data:")) {
            data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
          } // comments (":") and other fields (event:, id:, retry:) carry nothing the chat needs
        }
      }
      done = true;
      if (data.length) yield data.join("\n");
    } finally {
      if (!done) reader.cancel().catch(() => {});
    }
  }

  function setBusy(busy) {
    $("chat-send").disabled = busy;
    $("chat-stop").disabled = !busy;
    $("chat-model").disabled = busy;
  }

  function positiveInt(value) {
    const n = Number(value);
    return Number.isInteger(n) && n > 0 ? n : undefined;
  }

  async function onChat(event) {
    event.preventDefault();
    if (chatController) return;
    const input = $("chat-input");
    const text = input.value.trim();
    const model = $("chat-model").value;
    const status = $("chat-status");
    if (!text) return;
    if (!model) {
      status.textContent = "No model to chat with (the model list did not load).";
      return;
    }
    input.value = "";
    conversation.push({ role: "user", content: text });
    addMessage("user", text);
    const reply = addMessage("assistant", "");
    reply.item.classList.add("streaming");
    reply.item.setAttribute("aria-busy", "true");
    const body = {
      model,
      messages: conversation.slice(),
      stream: true,
      stream_options: { include_usage: true },
    };
    const maxTokens = positiveInt($("chat-max-tokens").value);
    if (maxTokens) body.max_tokens = maxTokens;
    const temperature = $("chat-temperature").value;
    if (temperature !== "" && !Number.isNaN(Number(temperature))) body.temperature = Number(temperature);

    const controller = new AbortController();
    chatController = controller;
    setBusy(true);
    status.textContent = "Generating…";
    let answer = "";
    let usage = null;
    let requestId = null;
    let finish = null;
    try {
      const response = await request("/v1/chat/completions", { method: "POST", body, signal: controller.signal });
      for await (const data of sseData(response.body)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(chunk.error.message || "The stream failed.", 0, chunk.error.code);
        if (chunk.id && !requestId) {
          requestId = chunk.id;
          reply.item.dataset.requestId = requestId; // the ledger's request id, as on the usage page
        }
        for (const choice of chunk.choices || []) {
          if (choice.delta && typeof choice.delta.content === "string" && choice.delta.content) {
            answer += choice.delta.content;
            reply.content.textContent = answer;
            reply.item.scrollIntoView({ block: "end" });
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
        if (chunk.usage) usage = chunk.usage;
      }
      conversation.push({ role: "assistant", content: answer });
      const parts = [];
      if (usage) {
        parts.push(
          `${fmtInt(usage.prompt_tokens)} prompt + ${fmtInt(usage.completion_tokens)} completion = ` +
            `${fmtInt(usage.total_tokens)} tokens`,
        );
      }
      if (finish) parts.push(`finish: ${finish}`);
      if (requestId) parts.push(`request ${requestId}`);
      reply.meta.textContent = parts.join(" · ");
      if (usage) {
        reply.item.dataset.promptTokens = String(usage.prompt_tokens);
        reply.item.dataset.completionTokens = String(usage.completion_tokens);
      }
      status.textContent = "Done.";
    } catch (e) {
      if (e.name === "AbortError") {
        reply.meta.textContent = `Stopped${requestId ? ` · request ${requestId}` : ""} (what was generated is billed).`;
        if (answer) conversation.push({ role: "assistant", content: answer });
        else conversation.pop(); // nothing came back: the question can be asked again without repeating it
        status.textContent = "Stopped.";
      } else {
        reply.item.classList.add("error-message");
        reply.content.textContent = answer;
        reply.meta.textContent = e.message;
        conversation.pop(); // drop the question that failed, so the conversation sent next time stays well-formed
        if (answer) conversation.push({ role: "user", content: text }, { role: "assistant", content: answer });
        status.textContent = "The request failed.";
      }
    } finally {
      reply.item.classList.remove("streaming");
      reply.item.removeAttribute("aria-busy");
      if (chatController === controller) chatController = null;
      if (session) setBusy(false);
    }
  }

  function onStop() {
    if (chatController) chatController.abort();
  }

  function onClearChat() {
    if (chatController) chatController.abort();
    conversation = [];
    $("transcript").replaceChildren();
    $("chat-status").textContent = "";
    $("chat-input").focus();
  }

  // --- usage --------------------------------------------------------------------------------------------

  let usageSeq = 0; // answers to superseded usage requests are dropped

  async function loadUsage() {
    const month = $("usage-month").value || thisMonth();
    $("usage-month").value = month;
    const error = $("usage-error");
    const seq = ++usageSeq;
    try {
      let path = `/v1/usage?month=${encodeURIComponent(month)}`;
      if (session.role === "admin") {
        const tenant = await chooseUsageTenant();
        if (!tenant) {
          showError(error, "There are no tenants yet: create one under Tenants & keys.");
          renderUsage(null);
          return;
        }
        path = `/admin/v1/usage?tenant=${encodeURIComponent(tenant)}&month=${encodeURIComponent(month)}`;
      }
      const usage = await getJson(path);
      if (seq !== usageSeq) return;
      showError(error, "");
      renderUsage(usage);
      if (session.role === "key") $("who").textContent = `Signed in to ${usage.tenant} with ${session.label}`;
    } catch (e) {
      if (seq !== usageSeq) return;
      showError(error, e.message);
      renderUsage(null);
    }
  }

  /** The admin's usage page names its tenant: fill the picker (keeping the choice) and return the choice. */
  async function chooseUsageTenant() {
    const select = $("usage-tenant");
    const chosen = select.value;
    const tenants = (await getJson("/admin/v1/tenants")).data;
    select.replaceChildren(...tenants.map((t) => el("option", { value: t.name, text: t.name })));
    if (tenants.some((t) => t.name === chosen)) select.value = chosen;
    return select.value;
  }

  function stat(label, value, id) {
    return el(
      "div",
      { class: "stat", id },
      el("div", { class: "label", text: label }),
      el("div", { class: "value", text: value }),
    );
  }

  function renderUsage(usage) {
    const summary = $("usage-summary");
    const models = $("usage-models");
    const recent = $("usage-recent");
    const tbody = models.querySelector("tbody");
    const tfoot = models.querySelector("tfoot");
    if (!usage) {
      summary.replaceChildren();
      tbody.replaceChildren();
      tfoot.replaceChildren();
      recent.querySelector("tbody").replaceChildren();
      $("usage-chart").replaceChildren();
      return;
    }
    const t = usage.totals;
    const stats = [
      stat("Requests", fmtInt(t.requests), "stat-requests"),
      stat("Tokens", fmtInt(t.prompt_tokens + t.completion_tokens), "stat-tokens"),
      stat("Cost (USD)", fmtUsd(t.cost_usd), "stat-cost"),
    ];
    if (usage.budget && usage.budget.limit_usd !== null && usage.budget.limit_usd !== undefined) {
      stats.push(stat("Budget (USD)", `${usage.budget.spent_usd} of ${usage.budget.limit_usd}`, "stat-budget"));
    }
    summary.replaceChildren(...stats);

    const row = (cells) => el("tr", {}, ...cells);
    const cell = (text, cls) => el("td", { class: cls, text });
    tbody.replaceChildren(
      ...(usage.models.length
        ? usage.models.map((m) =>
            row([
              el("th", { scope: "row", text: m.model }),
              cell(fmtInt(m.requests), "num"),
              cell(fmtInt(m.prompt_tokens), "num"),
              cell(fmtInt(m.completion_tokens), "num"),
              cell(fmtUsd(m.cost_usd), "num"),
            ]),
          )
        : [row([el("td", { colspan: 5, class: "empty", text: `No requests in ${usage.month}.` })])]),
    );
    tfoot.replaceChildren(
      row([
        el("th", { scope: "row", text: "Total" }),
        cell(fmtInt(t.requests), "num"),
        cell(fmtInt(t.prompt_tokens), "num"),
        cell(fmtInt(t.completion_tokens), "num"),
        cell(fmtUsd(t.cost_usd), "num"),
      ]),
    );

    drawChart($("usage-chart"), usage.daily || [], usage.month);

    recent.querySelector("tbody").replaceChildren(
      ...(usage.recent.length
        ? usage.recent.map((r) =>
            el(
              "tr",
              { "data-request-id": r.request_id },
              cell(fmtTime(r.started_at), "nowrap"),
              cell(r.request_id, "mono"),
              cell(r.model),
              el("td", {}, el("span", { class: `badge ${String(r.status).replace(/[^a-z]/g, "")}`, text: r.status })),
              cell(fmtInt(r.prompt_tokens), "num"),
              cell(fmtInt(r.completion_tokens), "num"),
              cell(fmtUsd(r.cost_usd), "num"),
            ),
          )
        : [row([el("td", { colspan: 7, class: "empty", text: "No requests yet." })])]),
    );
  }

  /** Tokens per day as an inline SVG bar chart (one bar per day of the month, a tooltip on each). */
  function drawChart(container, daily, month) {
    const W = 760;
    const H = 220;
    const left = 56;
    const right = 8;
    const top = 12;
    const bottom = 28;
    const plotW = W - left - right;
    const plotH = H - top - bottom;
    const max = Math.max(0, ...daily.map((d) => d.tokens));
    const scale = niceCeiling(max);
    const total = daily.reduce((sum, d) => sum + d.tokens, 0);
    const chart = svg("svg", {
      viewBox: `0 0 ${W} ${H}`,
      role: "img",
      "aria-label": `Tokens per day in ${month}: ${fmtInt(total)} in total`,
      preserveAspectRatio: "xMidYMid meet",
    });
    for (const frac of [0, 0.5, 1]) {
      const y = top + plotH - frac * plotH;
      chart.append(svg("line", { class: "axis", x1: left, x2: W - right, y1: y, y2: y }));
      chart.append(svg("text", { x: left - 6, y: y + 3, "text-anchor": "end" }, fmtInt(Math.round(frac * scale))));
    }
    const slot = plotW / Math.max(1, daily.length);
    daily.forEach((d, i) => {
      const h = scale ? (d.tokens / scale) * plotH : 0;
      const x = left + i * slot + slot * 0.15;
      const bar = svg("rect", {
        class: "bar",
        x: x.toFixed(2),
        y: (top + plotH - h).toFixed(2),
        width: (slot * 0.7).toFixed(2),
        height: h.toFixed(2),
        "data-date": d.date,
        "data-tokens": d.tokens,
      });
      bar.append(
        svg("title", {}, `${d.date}: ${fmtInt(d.tokens)} tokens, ${fmtInt(d.requests)} requests, $${d.cost_usd}`),
      );
      chart.append(bar);
      const day = Number(String(d.date).slice(8, 10));
      if (day === 1 || day % 5 === 0) {
        chart.append(svg("text", { x: (x + slot * 0.35).toFixed(2), y: H - 10, "text-anchor": "middle" }, day));
      }
    });
    container.replaceChildren(chart);
  }

  /** The smallest 1, 2 or 5 x 10^k at or above `n` (so the axis labels are round numbers). */
  function niceCeiling(n) {
    if (n <= 0) return 0;
    const power = 10 ** Math.floor(Math.log10(n));
    for (const step of [1, 2, 5, 10]) if (step * power >= n) return step * power;
    return 10 * power;
  }

  // --- admin: tenants and keys --------------------------------------------------------------------------

  async function loadAdmin() {
    const error = $("admin-error");
    try {
      const [tenants, keys] = await Promise.all([getJson("/admin/v1/tenants"), getJson("/admin/v1/keys")]);
      showError(error, "");
      renderTenants(tenants.data);
      renderKeys(keys.data);
    } catch (e) {
      showError(error, e.message);
    }
  }

  function renderTenants(tenants) {
    const tbody = $("tenants").querySelector("tbody");
    tbody.replaceChildren(
      ...(tenants.length
        ? tenants.map((t) =>
            el(
              "tr",
              {},
              el("td", { class: "num", text: t.id }),
              el("td", { text: t.name }),
              el("td", { text: fmtTime(t.created_at) }),
            ),
          )
        : [el("tr", {}, el("td", { colspan: 3, class: "empty", text: "No tenants yet." }))]),
    );
    const select = $("key-tenant");
    const chosen = select.value;
    select.replaceChildren(...tenants.map((t) => el("option", { value: t.name, text: t.name })));
    if (tenants.some((t) => t.name === chosen)) select.value = chosen;
  }

  function keyStatus(k) {
    if (k.revoked_at) return "revoked";
    if (k.expires_at && new Date(k.expires_at) <= new Date()) return "expired";
    return "active";
  }

  function renderKeys(keys) {
    const tbody = $("keys").querySelector("tbody");
    if (!keys.length) {
      tbody.replaceChildren(el("tr", {}, el("td", { colspan: 10, class: "empty", text: "No keys yet." })));
      return;
    }
    tbody.replaceChildren(
      ...keys.map((k) => {
        const status = keyStatus(k);
        const limits = [k.rpm ? `${fmtInt(k.rpm)} RPM` : null, k.tpm ? `${fmtInt(k.tpm)} TPM` : null]
          .filter(Boolean)
          .join(", ");
        const action = el("td");
        if (status !== "revoked") {
          const button = el("button", {
            type: "button",
            class: "danger",
            text: "Revoke",
            "aria-label": `Revoke key ${k.prefix}`,
          });
          button.addEventListener("click", () => revokeKey(k, button));
          action.append(button);
        }
        return el(
          "tr",
          { "data-key-id": k.id },
          el("td", { class: "num", text: k.id }),
          el("td", { text: k.tenant }),
          el("td", { text: k.name || "—" }),
          el("td", { class: "mono nowrap", text: `${k.prefix}…` }),
          el("td", { class: "nowrap", text: fmtTime(k.created_at) }),
          el("td", { class: "nowrap", text: k.expires_at ? fmtTime(k.expires_at) : "never" }),
          el("td", { text: k.models ? k.models.join(", ") : "all" }),
          el("td", { class: "nowrap", text: limits || "none" }),
          el("td", {}, el("span", { class: `badge ${status}`, text: status })),
          action,
        );
      }),
    );
  }

  async function onCreateTenant(event) {
    event.preventDefault();
    const input = $("tenant-name");
    const error = $("admin-error");
    const button = $("tenant-create");
    button.disabled = true;
    try {
      const tenant = await getJson("/admin/v1/tenants", { method: "POST", body: { name: input.value.trim() } });
      input.value = "";
      showError(error, "");
      await loadAdmin();
      $("key-tenant").value = tenant.name;
    } catch (e) {
      showError(error, e.message);
    } finally {
      button.disabled = false;
    }
  }

  async function onCreateKey(event) {
    event.preventDefault();
    const error = $("admin-error");
    const body = { tenant: $("key-tenant").value, name: $("key-name").value.trim() };
    if (!body.tenant) {
      showError(error, "Create a tenant first: every key belongs to one.");
      return;
    }
    const expires = $("key-expires").value;
    if (expires) body.expires_at = expires;
    const models = $("key-models")
      .value.split(",")
      .map((m) => m.trim())
      .filter(Boolean);
    if (models.length) body.models = models;
    for (const [field, id] of [["rpm", "key-rpm"], ["tpm", "key-tpm"]]) {
      const raw = $(id).value.trim();
      if (!raw) continue;
      const n = positiveInt(raw);
      if (!n) {
        showError(error, `${field.toUpperCase()} must be a whole number of at least 1 (or empty for no limit).`);
        return;
      }
      body[field] = n;
    }
    const button = $("key-create");
    button.disabled = true;
    try {
      const key = await getJson("/admin/v1/keys", { method: "POST", body });
      showError(error, "");
      for (const id of ["key-name", "key-expires", "key-models", "key-rpm", "key-tpm"]) $(id).value = "";
      showSecret(key);
      await loadAdmin();
    } catch (e) {
      showError(error, e.message);
    } finally {
      button.disabled = false;
    }
  }

  function showSecret(key) {
    $("new-secret-title").textContent = `New key for ${key.tenant}${key.name ? ` (${key.name})` : ""}`;
    const value = $("new-secret-value");
    value.value = key.secret;
    $("new-secret-copy").textContent = "Copy";
    $("new-secret").hidden = false;
    value.focus();
    value.select();
  }

  function hideSecret() {
    $("new-secret-value").value = "";
    $("new-secret").hidden = true;
  }

  async function onCopySecret() {
    const value = $("new-secret-value");
    try {
      await navigator.clipboard.writeText(value.value);
      $("new-secret-copy").textContent = "Copied";
    } catch (_) {
      value.select(); // no clipboard permission: leave it selected for Ctrl+C
    }
  }

  async function revokeKey(key, button) {
    const what = `${key.prefix}…${key.name ? ` (${key.name})` : ""} of ${key.tenant}`;
    if (!window.confirm(`Revoke the key ${what}? Requests with it will be refused from now on.`)) return;
    button.disabled = true;
    try {
      await request(`/admin/v1/keys/${encodeURIComponent(key.id)}/revoke`, { method: "POST" });
      await loadAdmin();
    } catch (e) {
      showError($("admin-error"), e.message);
      button.disabled = false;
    }
  }

  // --- wiring -------------------------------------------------------------------------------------------

  function init() {
    $("signin-form").addEventListener("submit", onSignIn);
    $("sign-out").addEventListener("click", () => signOut());
    for (const tab of document.querySelectorAll("nav .tab")) {
      tab.addEventListener("click", () => route(tab.dataset.view));
    }
    window.addEventListener("hashchange", () => {
      if (session) route(location.hash.slice(1));
    });
    $("chat-form").addEventListener("submit", onChat);
    $("chat-input").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        $("chat-form").requestSubmit();
      }
    });
    $("chat-stop").addEventListener("click", onStop);
    $("chat-clear").addEventListener("click", onClearChat);
    $("usage-month").value = thisMonth();
    $("usage-month").addEventListener("change", loadUsage);
    $("usage-tenant").addEventListener("change", loadUsage);
    $("usage-refresh").addEventListener("click", loadUsage);
    $("admin-refresh").addEventListener("click", loadAdmin);
    $("tenant-form").addEventListener("submit", onCreateTenant);
    $("key-form").addEventListener("submit", onCreateKey);
    $("new-secret-copy").addEventListener("click", onCopySecret);
    $("new-secret-dismiss").addEventListener("click", hideSecret);
    setBusy(false);

    let saved = null;
    try {
      saved = JSON.parse(sessionStorage.getItem(STORAGE_KEY) || "null");
    } catch (_) {
      sessionStorage.removeItem(STORAGE_KEY);
    }
    if (saved && typeof saved.token === "string" && (saved.role === "key" || saved.role === "admin")) {
      startSession(saved);
    } else {
      show("signin");
      $("signin-key").focus();
    }
  }

  init();
})();
