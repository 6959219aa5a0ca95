"""Write a small synthetic support-desk dataset for Lumen & Oak, a fictional homeware shop.

    python examples/customer_service/make_data.py [--out examples/customer_service/data] [--seed 0]

The shop's policies are ten facts (return window, refund time, shipping time and cost, free-shipping threshold,
express delivery, warranty, store hours, support email, loyalty points), each with a short key fact such as
"30 days" or "$4.99". Conversations are produced by templates: a fixed system prompt, a customer question
(several phrasings per fact, with greetings, products and sign-offs mixed in) and an answer that states the
fact (several phrasings). A quarter of the training conversations ask two questions in two turns.

Writes, in OpenAI's fine-tuning chat format (one {"messages": [...]} per line):
  train.jsonl    the training conversations
  val.jsonl      validation conversations: the same templates, none identical to a training conversation
  heldout.jsonl  questions phrased with templates that training never uses, each with a reference answer
                 (also in a wording training never uses) and, beside "messages", its "topic" and "key_fact"
  facts.json     the policies: topic -> key fact and the sentence that states it
Everything follows from --seed: the same seed writes the same bytes.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from pathlib import Path

from lmforge import atomic

SHOP = "Lumen & Oak"
SYSTEM = (
    f"You are the customer support assistant of {SHOP}, an online homeware shop. "
    "Answer the customer's question briefly and accurately."
)

# topic -> (key fact, answer phrasings for training, the held-out reference answer). Every answer states the key
# fact verbatim, so "the answer contains the key fact" is the evaluation's match.
FACTS: dict[str, tuple[str, list[str], str]] = {
    "returns": (
        "30 days",
        [
            "You can return any unused item within 30 days of delivery for a full refund.",
            "Our return window is 30 days from the day your order arrives; the item just needs to be unused "
            "and in its original packaging.",
            "Returns are accepted for 30 days after delivery. Start one from your account page and we will "
            "email you a prepaid label.",
        ],
        "No problem: you have 30 days from delivery to send it back for a full refund.",
    ),
    "refund_time": (
        "7 business days",
        [
            "Once your return reaches our warehouse, the refund goes back to your original payment method "
            "within 7 business days.",
            "Refunds are processed within 7 business days of us receiving the returned item.",
            "You will see the money back on your card within 7 business days after we receive the return.",
        ],
        "As soon as the parcel is back with us, we refund you within 7 business days.",
    ),
    "shipping_time": (
        "3-5 business days",
        [
            "Standard delivery takes 3-5 business days.",
            "With standard shipping, your order arrives in 3-5 business days.",
            "We dispatch within a day, and standard shipping then takes 3-5 business days.",
        ],
        "A regular order reaches you in 3-5 business days.",
    ),
    "shipping_cost": (
        "$4.99",
        [
            "Standard shipping costs $4.99 per order.",
            "We charge a flat $4.99 for standard shipping.",
            "Shipping is a flat rate of $4.99 for each order, whatever its size.",
        ],
        "Regular delivery adds $4.99 to your order at checkout.",
    ),
    "free_shipping": (
        "$50",
        [
            "Shipping is free on every order over $50.",
            "Orders over $50 ship for free.",
            "Spend more than $50 and standard shipping is on us.",
        ],
        "Once your cart is above $50, we deliver it for free.",
    ),
    "express": (
        "$12.99",
        [
            "Express shipping costs $12.99 and arrives the next business day.",
            "Yes: choose express at checkout. It costs $12.99 and delivers the next business day.",
            "Our express option is $12.99; order before 2pm and it arrives the next business day.",
        ],
        "Pick express delivery for $12.99 and it is with you the next business day.",
    ),
    "warranty": (
        "2 years",
        [
            "All our products come with a warranty for 2 years from the date of purchase.",
            "Everything we sell is covered by our warranty for 2 years; just send us a photo of the fault.",
            "Our warranty lasts 2 years and covers any manufacturing defect.",
        ],
        "Manufacturing faults are covered for 2 years after you buy.",
    ),
    "hours": (
        "9am to 6pm",
        [
            "Our shop in Bristol is open from 9am to 6pm, Monday to Saturday.",
            "We're open 9am to 6pm, Monday to Saturday, and closed on Sundays.",
            "You can visit our Bristol shop from 9am to 6pm every day except Sunday.",
        ],
        "Drop by any day but Sunday, from 9am to 6pm.",
    ),
    "email": (
        "help@lumenandoak.com",
        [
            "You can email our support team at help@lumenandoak.com.",
            "Write to us at help@lumenandoak.com and we'll reply within a day.",
            "Our support address is help@lumenandoak.com.",
        ],
        "Send them to help@lumenandoak.com and our team will get back to you.",
    ),
    "loyalty": (
        "100 points",
        [
            "You earn 1 point for every $1 you spend, and every 100 points give you $5 off.",
            "Our loyalty programme gives 1 point per $1; once you have 100 points you can redeem them for $5 "
            "off your next order.",
            "Every 100 points you collect are worth $5 off, and you earn 1 point for each dollar spent.",
        ],
        "Collect 100 points (1 point per $1 spent) and they turn into $5 off.",
    ),
}

# topic -> question phrasings used for training; {item} is a product.
TRAIN_QUESTIONS: dict[str, list[str]] = {
    "returns": [
        "How long do I have to return {item}?",
        "What is your return policy?",
        "Can I still send back {item} I bought a few weeks ago?",
        "How many days do I get to return something?",
        "I changed my mind about {item}. Can I return it?",
        "Is there a time limit on returns?",
        "Until when can I return my order?",
        "Do you accept returns, and for how long?",
    ],
    "refund_time": [
        "How long does a refund take?",
        "When will I get my money back for {item}?",
        "I returned {item}. When will the refund arrive?",
        "How quickly do you process refunds?",
        "How many days until my refund shows up?",
        "I sent back my order last week. When do I get refunded?",
    ],
    "shipping_time": [
        "How long does delivery take?",
        "When will {item} arrive if I order today?",
        "How long is standard shipping?",
        "How fast do you ship?",
        "How many days does shipping take?",
        "If I order {item} now, when will I get it?",
    ],
    "shipping_cost": [
        "How much is shipping?",
        "What do you charge for delivery?",
        "How much will it cost to ship {item}?",
        "Is shipping expensive?",
        "What's the delivery fee?",
        "Do I have to pay for shipping on {item}?",
    ],
    "free_shipping": [
        "Do you offer free shipping?",
        "Is there a minimum order for free delivery?",
        "How much do I need to spend to get free shipping?",
        "Can I get {item} delivered for free?",
        "When is shipping free?",
        "Is delivery ever free?",
    ],
    "express": [
        "Do you have express delivery?",
        "Can I get {item} faster?",
        "How much is next-day delivery?",
        "I need {item} tomorrow. Is that possible?",
        "What does express shipping cost?",
        "Is there a quicker shipping option?",
    ],
    "warranty": [
        "Is {item} under warranty?",
        "How long is the warranty?",
        "What does your warranty cover?",
        "The {item} I bought broke after a few months. Is it covered?",
        "Do your products have a guarantee?",
        "How long are your products guaranteed for?",
    ],
    "hours": [
        "What are your opening hours?",
        "When is the store open?",
        "What time do you open?",
        "What time do you close?",
        "Are you open on Saturday?",
        "Can I come to the shop to see {item}?",
    ],
    "email": [
        "What's your email address?",
        "How can I contact support?",
        "Can I email you about {item}?",
        "Where do I send a complaint?",
        "How do I reach customer service?",
        "Who do I write to about my order?",
    ],
    "loyalty": [
        "Do you have a loyalty program?",
        "How do loyalty points work?",
        "How many points do I need for a discount?",
        "Do I earn points when I buy {item}?",
        "What are your reward points worth?",
        "How do I redeem my points?",
    ],
}

# Phrasings training never sees: the held-out questions.
HELDOUT_QUESTIONS: dict[str, list[str]] = {
    "returns": [
        "What's the deadline for sending {item} back to you?",
        "If I'm not happy with {item}, how much time do I have to get my money back?",
        "Could you remind me how long the return period lasts?",
    ],
    "refund_time": [
        "After you get my return, how soon is the money back on my card?",
        "What's the usual wait for a refund once the parcel is back with you?",
        "Roughly when should I expect to be reimbursed for {item}?",
    ],
    "shipping_time": [
        "What's the typical delivery time for a normal order?",
        "How soon would {item} get to my door with regular shipping?",
        "Roughly how many days should I wait for my parcel?",
    ],
    "shipping_cost": [
        "What will I pay in postage on a regular order?",
        "How much do you add for standard delivery at checkout?",
        "What's the shipping charge if I buy {item}?",
    ],
    "free_shipping": [
        "What order total qualifies for free postage?",
        "Is there a threshold above which you don't charge for delivery?",
        "If I add {item} to my cart, at what amount does shipping become free?",
    ],
    "express": [
        "Is there a rush option, and what does it cost?",
        "What's the price to have {item} delivered by the next working day?",
        "How much extra for speedy delivery?",
    ],
    "warranty": [
        "For how long are manufacturing faults covered?",
        "My {item} stopped working. What's the guarantee period?",
        "What is the length of the warranty on your products?",
    ],
    "hours": [
        "When can I drop by your shop?",
        "Until what time can I visit the store in person?",
        "What are the hours of your Bristol showroom?",
    ],
    "email": [
        "Which address should I use to get in touch by email?",
        "I'd like to send you photos of {item}. Where should I send them?",
        "How can I get hold of your support team in writing?",
    ],
    "loyalty": [
        "How many points must I collect before I can get money off?",
        "Tell me about your rewards scheme.",
        "Will buying {item} get me any rewards, and how do I use them?",
    ],
}

ITEMS = [
    "the oak side table",
    "a linen throw",
    "the ceramic vase",
    "a brass desk lamp",
    "the wool rug",
    "two glass tumblers",
    "the walnut bookshelf",
    "a set of mugs",
    "the rattan chair",
    "a cotton duvet cover",
]
GREETINGS = ["", "", "Hi! ", "Hello, ", "Hey there. ", "Good morning! ", "Hi, quick question: "]
SIGN_OFFS = ["", "", " Thanks!", " Thank you.", " Cheers."]
OPENERS = ["", "", "Happy to help! ", "Sure. ", "Good question! ", "Thanks for asking. "]
CLOSERS = [
    "",
    "",
    " Is there anything else I can help with?",
    " Let me know if you have any other questions.",
]
HELDOUT_RENDERINGS = 2  # each held-out phrasing is asked twice, with different greetings and products


def _capitalise_after_greeting(greeting: str, question: str) -> str:
    # "Hello, how long ..." reads better than "Hello, How long ..."; "Hi! How long ..." keeps the capital.
    if greeting.endswith((", ", ": ")) and not question.startswith(("I ", "I'")):
        return question[0].lower() + question[1:]
    return question


def ask(rng: random.Random, template: str) -> str:
    greeting = rng.choice(GREETINGS)
    question = template.format(item=rng.choice(ITEMS))
    return greeting + _capitalise_after_greeting(greeting, question) + rng.choice(SIGN_OFFS)


def answer(rng: random.Random, topic: str) -> str:
    return rng.choice(OPENERS) + rng.choice(FACTS[topic][1]) + rng.choice(CLOSERS)


def training_conversation(rng: random.Random, topics: list[str]) -> dict:
    """One conversation: the system prompt, then a question and its answer per topic."""
    messages = [{"role": "system", "content": SYSTEM}]
    for topic in topics:
        messages.append({"role": "user", "content": ask(rng, rng.choice(TRAIN_QUESTIONS[topic]))})
        messages.append({"role": "assistant", "content": answer(rng, topic)})
    return {"messages": messages}


def make_conversations(
    rng: random.Random, n: int, avoid: Sequence[dict] = (), two_turn_share: float = 0.25
) -> list[dict]:
    """n distinct conversations, none in `avoid`; topics cycle so each fact appears equally often, two-turn
    ones add a second topic."""
    topics = list(FACTS)
    seen = {json.dumps(c) for c in avoid}
    out = []
    while len(out) < n:
        chosen = [topics[len(out) % len(topics)]]
        if rng.random() < two_turn_share:
            chosen.append(rng.choice([t for t in topics if t != chosen[0]]))
        conversation = training_conversation(rng, chosen)
        if json.dumps(conversation) not in seen:
            seen.add(json.dumps(conversation))
            out.append(conversation)
    rng.shuffle(out)
    return out


def make_heldout(rng: random.Random) -> list[dict]:
    """Every held-out phrasing HELDOUT_RENDERINGS times (distinct questions), with the reference answer."""
    out = []
    for topic, templates in HELDOUT_QUESTIONS.items():
        key, _, reference = FACTS[topic]
        for template in templates:
            asked: set[str] = set()
            while len(asked) < HELDOUT_RENDERINGS:
                question = ask(rng, template)
                if question in asked:
                    continue
                asked.add(question)
                messages = [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": reference},
                ]
                out.append({"messages": messages, "topic": topic, "key_fact": key})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "data"), help="output folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=400, help="training conversations")
    ap.add_argument("--val", type=int, default=40, help="validation conversations")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train = make_conversations(rng, args.train)
    val = make_conversations(rng, args.val, avoid=train)
    heldout = make_heldout(rng)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "val.jsonl", val)
    write_jsonl(out / "heldout.jsonl", heldout)
    facts = {topic: {"key_fact": key, "fact": answers[0]} for topic, (key, answers, _) in FACTS.items()}
    atomic.write_json(out / "facts.json", facts)
    print(
        f"wrote {len(train)} training, {len(val)} validation and {len(heldout)} held-out conversations to {out}"
    )


if __name__ == "__main__":
    main()
