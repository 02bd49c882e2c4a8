"""`extract-email`: answer with exactly the email address found in a message."""

from __future__ import annotations

import random

from training.tasks.base import AdapterSpec, Example, Task, TrainSpec, pools
from training.tasks.json_extract import FIRST_NAMES, FIRST_NAMES_HELDOUT, LAST_NAMES, LAST_NAMES_HELDOUT

DOMAINS = (
    "example.com", "mailbox.org", "acme-corp.com", "northwind.net", "fastmail.com", "globex.io", "uni-hamburg.de",
    "studio42.co", "greenfield.org", "bluewave.com", "mail.com.au", "post.co.nz", "school.ac.jp", "shop.com.br",
)  # fmt: skip
DOMAINS_HELDOUT = ("harbor-labs.dev", "kitchen.co.uk", "orbitals.space", "pinecone.app", "sunrise-travel.fr")
LOCAL_PARTS = (
    "{f}.{l}", "{f}{l}", "{f0}{l}", "{f}_{l}{n}", "{f}{n}", "{l}{f0}", "{l}_{f}", "{f0}{l}{n}", "{l}{n}", "{f0}_{l}",
    "{l}.{f0}", "{f0}{n}.{l}", "{l}_{f0}{n}", "{f}.{l}{n}", "{l}.{n}",
)  # fmt: skip
LOCAL_PARTS_HELDOUT = ("{l}.{f}", "{f0}.{l}{n}", "{f}-{l}")
TEMPLATES = (
    "Please contact {first} at {email} for details.",
    "You can reach me at {email} anytime.",
    "Send the invoice to {email} before Friday.",
    "My email is {email}, thanks!",
    "Questions? Write to {email}.",
    "Call 555-01{n} or email {email} after 5pm.",
    "{first} {last} ({email}) will join the meeting on Monday.",
    "For the order #48{n}, the buyer's address is {email}.",
    "Visit www.{site} or send a note to {email}.",
    "Hi team, cc {email} on the report please.",
    "Ticket 4{n} was opened by {email} on 12 June.",
    "Her address {email} has been on file since 2019.",
    "Email {email} (ext. 2{n}) with any questions.",
    "From: {email}\nSubject: order 3{n}\nThanks for the quick delivery.",
    "To apply, mail {email} with your CV.",
    "Contact: {email} (weekdays only)",
)
TEMPLATES_HELDOUT = (
    "For support, drop a line to {email} or visit our office.",
    "{first} {last} <{email}> wrote: see you tomorrow at 9.",
    "Reply-to: {email} | Subject: Quarterly numbers",
    "The form was submitted by {email} on 3 May, ticket 77{n}.",
    "Need a quote? {first} handles it, just mail {email} today.",
)


def make_email(rng: random.Random, split: str, first: str, last: str) -> str:
    local = rng.choice(pools(split, LOCAL_PARTS, LOCAL_PARTS_HELDOUT))
    local = local.format(f=first.lower(), l=last.lower(), f0=first[0].lower(), n=rng.randint(1, 99))
    return f"{local}@{rng.choice(pools(split, DOMAINS, DOMAINS_HELDOUT))}"


def generate(rng: random.Random, split: str) -> Example:
    first = rng.choice(pools(split, FIRST_NAMES, FIRST_NAMES_HELDOUT))
    last = rng.choice(pools(split, LAST_NAMES, LAST_NAMES_HELDOUT))
    email = make_email(rng, split, first, last)
    template = rng.choice(pools(split, TEMPLATES, TEMPLATES_HELDOUT))
    site = rng.choice(pools(split, DOMAINS, DOMAINS_HELDOUT))
    return Example(template.format(first=first, last=last, email=email, n=rng.randint(10, 99), site=site), email)


def score(output: str, example: Example) -> bool:
    """The output is exactly the address, nothing else."""
    return output.strip() == example.answer


TASK = Task(
    name="extract-email",
    summary="Answers with exactly the email address contained in a message, nothing else.",
    data="A short message holding one email address (15 local-part patterns, 14 domains, 16 templates, some with "
    "phone numbers, URLs and order numbers as distractors). Held-out prompts use 5 other templates, other names, "
    "3 other local-part patterns and 5 other domains.",
    generate=generate,
    score=score,
    adapter=AdapterSpec(
        rank=8, alpha=8, targets=("q_proj", "k_proj", "v_proj", "up_proj", "down_proj"), use_rslora=True
    ),
    train=TrainSpec(steps=120, lr=2e-3, num_examples=800),
    max_new_tokens=32,
)
