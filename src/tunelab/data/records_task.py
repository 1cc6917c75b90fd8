"""The built-in synthetic task behind `tunelab quickstart`: sentence -> JSON record.

Each example is one short free-text sentence about a person's payment; the target is the
record as canonical JSON. The facts are copied straight from the sentence, so a small model
can learn the task in minutes; what the base model lacks is the exact output contract: key
order, month names -> YYYY-MM-DD, and amounts stripped of currency and separators
("$1,299.00" -> 1299, "45.50 EUR" -> 45.5).
"""

import json
import random
from datetime import date, timedelta

TASK_NAME = "record-extraction"

SYSTEM_PROMPT = "Extract name, age, city, date (YYYY-MM-DD) and amount (a number) as a JSON object with those keys."

FIELDS = ("name", "age", "city", "date", "amount")

# ASCII only, so the JSON target never contains \u escapes. No entry is a word of another
# list or of a template, so each sentence names exactly one person and one city.
FIRST_NAMES = (
    "Maria",
    "Kenji",
    "Aisha",
    "Liam",
    "Priya",
    "Mateo",
    "Sofia",
    "Omar",
    "Yuki",
    "Lars",
    "Chloe",
    "Diego",
    "Fatima",
    "Noah",
    "Mei",
    "Ivan",
    "Amara",
    "Lucas",
    "Ingrid",
    "Ravi",
    "Zara",
    "Hiroshi",
    "Elena",
    "Kwame",
    "Olga",
    "Ahmed",
    "Isabel",
    "Wei",
    "Nadia",
    "Pablo",
    "Hannah",
    "Tariq",
    "Leila",
    "Jonas",
    "Ana",
    "Samuel",
    "Keiko",
    "Arjun",
    "Emma",
    "Tomas",
)
LAST_NAMES = (
    "Lopez",
    "Sato",
    "Bello",
    "Murphy",
    "Sharma",
    "Garcia",
    "Rossi",
    "Haddad",
    "Tanaka",
    "Nilsson",
    "Dubois",
    "Fernandez",
    "Khan",
    "Smith",
    "Wang",
    "Petrov",
    "Okafor",
    "Silva",
    "Larsen",
    "Patel",
    "Ahmadi",
    "Kim",
    "Novak",
    "Mensah",
    "Ivanova",
    "Mansour",
    "Santos",
    "Chen",
    "Kowalski",
    "Moreno",
    "Schmidt",
    "Rahman",
    "Nasser",
    "Weber",
    "Costa",
    "Cohen",
    "Nakamura",
    "Gupta",
    "Brown",
    "Horvat",
)
CITIES = (
    "Lisbon",
    "Osaka",
    "Nairobi",
    "Lima",
    "Oslo",
    "Cairo",
    "Dublin",
    "Seoul",
    "Toronto",
    "Madrid",
    "Berlin",
    "Mumbai",
    "Sydney",
    "Istanbul",
    "Hanoi",
    "Lagos",
    "Bogota",
    "Vienna",
    "Warsaw",
    "Prague",
    "Athens",
    "Helsinki",
    "Manila",
    "Jakarta",
    "Santiago",
    "Montreal",
    "Chicago",
    "Denver",
    "Auckland",
    "Reykjavik",
    "Marrakesh",
    "Kyoto",
    "Munich",
    "Porto",
    "Accra",
    "New York",
    "Buenos Aires",
    "Cape Town",
    "Mexico City",
    "Hong Kong",
)

MIN_AGE, MAX_AGE = 18, 90
FIRST_DATE, LAST_DATE = date(2015, 1, 1), date(2025, 12, 31)

# Spelled out here rather than via strftime("%B"), which depends on the locale.
MONTH_NAMES = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)

# Each template words the age its own way, so the phrasing around the age varies too.
SENTENCE_TEMPLATES = (
    "On {date}, {name} ({age}) from {city} paid {amount}.",
    "Invoice: {amount} — customer {name}, aged {age}, {city}, dated {date}.",
    "{name}, a {age}-year-old from {city}, spent {amount} on {date}.",
    "Payment of {amount} received from {name} ({city}, age {age}) on {date}.",
    "{city} branch: {name}, {age}, transferred {amount} on {date}.",
    "Date: {date}. Customer: {name}. Age: {age}. City: {city}. Total: {amount}.",
    "{name} is {age} years old, lives in {city}, and was refunded {amount} on {date}.",
    "Receipt {date} | {city} | {name} | age {age} | {amount}",
    "Booking confirmed for {name} (age {age}) in {city} on {date}, total {amount}.",
    "{amount} was donated by {name} of {city}, aged {age}, on {date}.",
    "Order placed {date} by {age}-year-old {name} in {city} for {amount}.",
    "Hi, I'm {name}, {age}, from {city}. On {date} I was charged {amount}.",
    "Record: name {name}; age {age}; city {city}; date {date}; amount {amount}.",
    "In {city}, {name} (aged {age}) withdrew {amount} on {date}.",
)

# "{}" is the number as written; currency marks are noise the model must learn to drop.
AMOUNT_STYLES = ("{}", "${}", "€{}", "£{}", "{} USD", "{} EUR", "{} GBP", "EUR {}", "CHF {}")


def make_record(rng: random.Random, name: str | None = None) -> dict:
    """A random record; pass `name` to pin the person (make_splits keeps eval people apart)."""
    if name is None:
        name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    day = FIRST_DATE + timedelta(days=rng.randint(0, (LAST_DATE - FIRST_DATE).days))
    return {
        "name": name,
        "age": rng.randint(MIN_AGE, MAX_AGE),
        "city": rng.choice(CITIES),
        "date": day.isoformat(),
        "amount": _random_amount(rng),
    }


def _random_amount(rng: random.Random) -> int | float:
    """7, 45.5 or 1299.99: 1-4 integer digits and 0-2 decimals, int when whole."""
    digits = rng.randint(1, 4)  # uniform over magnitudes, so thousands separators are common
    whole = rng.randint(10 ** (digits - 1), 10**digits - 1)
    decimals = rng.choice((0, 1, 2))
    if decimals == 0:
        return whole
    cents = rng.randint(1, 9) * 10 if decimals == 1 else rng.randint(1, 99)
    # An exact integer division gives the double nearest the 2-decimal value, so the JSON
    # shows e.g. 1299.99, never 1299.9899999.
    return (whole * 100 + cents) / 100


def render_sentence(record: dict, rng: random.Random) -> str:
    """One free-text sentence stating every field of `record`, in a random template and format."""
    template = rng.choice(SENTENCE_TEMPLATES)
    return template.format(
        name=record["name"],
        age=record["age"],
        city=record["city"],
        date=_format_date(date.fromisoformat(record["date"]), rng),
        amount=_format_amount(record["amount"], rng),
    )


def _format_date(day: date, rng: random.Random) -> str:
    # Only formats with the month spelled out or in ISO order: 04/03/2021 would be ambiguous.
    month = MONTH_NAMES[day.month - 1]
    return rng.choice(
        (
            day.isoformat(),
            f"{month} {day.day}, {day.year}",
            f"{day.day} {month} {day.year}",
            f"{month[:3]} {day.day}, {day.year}",
            f"{day.day} {month[:3]} {day.year}",
        )
    )


def _format_amount(amount: int | float, rng: random.Random) -> str:
    whole, cents = divmod(round(amount * 100), 100)
    whole_text = f"{whole:,}" if rng.random() < 0.5 else str(whole)
    # Trailing zeros are written both ways; the target drops them ("45.50" -> 45.5).
    if cents == 0:
        number = whole_text + rng.choice(("", ".00"))
    elif cents % 10 == 0:
        number = whole_text + rng.choice((f".{cents // 10}", f".{cents:02d}"))
    else:
        number = f"{whole_text}.{cents:02d}"
    return rng.choice(AMOUNT_STYLES).format(number)


def record_to_json(record: dict) -> str:
    """The canonical target text: keys in FIELDS order, one line."""
    return json.dumps({field: record[field] for field in FIELDS}, separators=(", ", ": "))


def make_splits(n_train: int, n_eval: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Train and eval rows in chat "messages" format, sharing no person, record or sentence.

    Each eval row is a distinct person who never appears in training, so eval measures
    extraction from unseen text rather than recall. Eval is drawn first, so it does not change
    with n_train.
    """
    if n_train < 0 or n_eval < 0:
        raise ValueError(f"split sizes must be >= 0, got n_train={n_train}, n_eval={n_eval}")
    all_names = [f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES]
    names_needed_for_train = 1 if n_train else 0
    if n_eval + names_needed_for_train > len(all_names):
        raise ValueError(f"n_eval={n_eval} needs one distinct person per row, and training needs people of its own; only {len(all_names)} names exist")

    rng = random.Random(seed)
    rng.shuffle(all_names)
    eval_names, train_names = all_names[:n_eval], all_names[n_eval:]
    eval_rows = [_to_chat_row(make_record(rng, name), rng) for name in eval_names]

    # Names repeat across training rows; whole records do not. With over 10^12 possible records
    # per name, the loop ends after about n_train draws.
    train_rows: list[dict] = []
    seen_targets: set[str] = set()
    while len(train_rows) < n_train:
        record = make_record(rng, rng.choice(train_names))
        target = record_to_json(record)
        if target not in seen_targets:
            seen_targets.add(target)
            train_rows.append(_to_chat_row(record, rng))
    return train_rows, eval_rows


def _to_chat_row(record: dict, rng: random.Random) -> dict:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": render_sentence(record, rng)},
            {"role": "assistant", "content": record_to_json(record)},
        ]
    }


def corrupt_record(record: dict, rng: random.Random) -> dict:
    """The record with one field made wrong: what a near-miss extraction looks like."""
    wrong = dict(record)
    field = rng.choice(FIELDS)
    if field == "name":
        first, last = record["name"].split(" ", 1)
        wrong["name"] = f"{first} {rng.choice([n for n in LAST_NAMES if n != last])}"
    elif field == "age":
        wrong["age"] = record["age"] + rng.choice((-10, -1, 1, 10))
    elif field == "city":
        wrong["city"] = rng.choice([c for c in CITIES if c != record["city"]])
    elif field == "date":
        wrong["date"] = (date.fromisoformat(record["date"]) + timedelta(days=rng.choice((-31, -1, 1, 365)))).isoformat()
    else:
        wrong["amount"] = record["amount"] * 10 if rng.random() < 0.5 else record["amount"] + 1
    return wrong


def preference_row(chat_row: dict, rejected_text: str) -> dict:
    """A conversational preference row: the chat row's prompt turns, its answer as chosen."""
    *prompt, answer = chat_row["messages"]
    return {"prompt": prompt, "chosen": [answer], "rejected": [{"role": "assistant", "content": rejected_text}]}


def make_preference_splits(n_train: int, n_eval: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """make_splits' rows as preference pairs: chosen the correct record, rejected one with a field corrupted."""
    rng = random.Random(f"{seed}-preference")
    train_rows, eval_rows = make_splits(n_train, n_eval, seed)

    def pair(row: dict) -> dict:
        record = json.loads(row["messages"][-1]["content"])
        return preference_row(row, record_to_json(corrupt_record(record, rng)))

    return [pair(row) for row in train_rows], [pair(row) for row in eval_rows]
