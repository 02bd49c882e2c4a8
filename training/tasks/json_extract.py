"""`json-extract`: answer with `{"name": ..., "city": ..., "age": ...}` taken from a sentence about a person."""

from __future__ import annotations

import json
import random

from training.tasks.base import AdapterSpec, Example, Task, TrainSpec, pools

FIRST = (
    "Maria", "John", "Aisha", "Kenji", "Lucas", "Fatima", "Olga", "Pedro", "Chloe", "Rahul", "Ingrid", "Tomasz",
    "Amara", "Diego", "Hannah", "Yusuf", "Lena", "Marco", "Priya", "Samuel", "Nadia", "Oscar", "Julia", "Hiroshi",
    "Clara", "Emeka", "Sofia", "Viktor", "Grace", "Mateo", "Elif", "Noah", "Zara", "Felix", "Ana", "Omar",
)  # fmt: skip
FIRST_HELDOUT = (
    "Beatriz", "Kwame", "Sven", "Mei", "Rosa", "Arjun", "Leila", "Bruno", "Freya", "Tariq", "Ilse", "Nikolai",
    "Carmen", "Jonas", "Yara", "Dmitri",
)  # fmt: skip
LAST = (
    "Silva", "Smith", "Khan", "Tanaka", "Martin", "Haddad", "Ivanova", "Gomez", "Dubois", "Sharma", "Berg", "Nowak",
    "Okafor", "Lopez", "Schmidt", "Demir", "Weber", "Rossi", "Patel", "Cohen", "Ali", "Larsen", "Costa", "Sato",
)  # fmt: skip
LAST_HELDOUT = ("Mensah", "Lindqvist", "Chen", "Moreau", "Kowalski", "Reyes", "Novak", "Fischer", "Park", "Bianchi")
# Rarer, many-token names teach copying rather than recalling a name seen in training.
FIRST_NAMES = (*FIRST, "Anneliese", "Bartholomew", "Guadalupe", "Oluwaseun", "Siobhan", "Xiomara", "Thorvald",
               "Evangelina", "Radoslaw", "Chiamaka", "Ignatius", "Wilhelmina", "Svetlana", "Thaddeus", "Nkechi",
               "Leopold", "Marisol", "Kazimierz", "Ottoline", "Benedikt", "Jessamine", "Anastasios")  # fmt: skip
FIRST_NAMES_HELDOUT = FIRST_HELDOUT
LAST_NAMES = (*LAST, "Papadopoulos", "Wojciechowski", "Nakamura", "Fitzgerald", "Abernathy", "Oyelaran",
              "Castellanos", "Szabo", "Vasquez", "Kristiansen", "Mbeki", "Dragomir", "Halvorsen", "Quintero",
              "Baptiste", "Yamamoto", "Ferreira", "Rasmussen", "Achterberg", "Gonzaga")  # fmt: skip
LAST_NAMES_HELDOUT = LAST_HELDOUT
CITY = (
    "Lisbon", "Chicago", "Lagos", "Osaka", "Lyon", "Cairo", "Kazan", "Madrid", "Montreal", "Pune", "Oslo", "Krakow",
    "Nairobi", "Bogota", "Hamburg", "Izmir", "Vienna", "Naples", "Delhi", "Haifa", "Dubai", "Bergen", "Porto",
    "Kyoto", "Denver", "Manila", "Seville", "Glasgow", "Perth", "Quito", "Reykjavik", "Ouagadougou", "Thessaloniki",
    "Wroclaw", "Bratislava", "Yogyakarta", "Chattanooga", "Kaohsiung", "Guadalajara", "Antananarivo", "Valparaiso",
    "Tbilisi", "Yerevan", "Almaty", "Ulaanbaatar", "Kathmandu", "Chennai", "Hyderabad", "Surabaya", "Da Nang",
    "Casablanca", "Marrakesh", "Dakar", "Kumasi", "Mombasa", "Kampala", "Kigali", "Durban", "Windhoek", "Recife",
    "Cordoba", "Montevideo", "Asuncion", "Medellin", "Cartagena", "Winnipeg", "Halifax", "Anchorage", "Tucson",
    "New Orleans", "Salt Lake City", "Rio de Janeiro", "Buenos Aires", "Tel Aviv", "Cape Town", "Hong Kong",
    "Kuala Lumpur", "Zurich", "Antwerp", "Rotterdam", "Aarhus", "Tampere", "Tallinn", "Vilnius", "Plovdiv",
    "Cluj-Napoca", "Szeged", "Brno", "Innsbruck", "Palermo", "Bilbao", "Coimbra", "Cork", "Cardiff",
)  # fmt: skip
CITY_HELDOUT = (
    "Accra", "Gothenburg", "Shanghai", "Marseille", "Gdansk", "Valencia", "Ljubljana", "Munich", "Busan", "Turin",
    "Boston", "Lima", "Edinburgh", "Adelaide", "Chiang Mai", "Addis Ababa", "Sao Paulo", "Vancouver", "Bordeaux",
    "Krasnoyarsk",
)  # fmt: skip
TEMPLATES = (
    "{name} is {age} years old and lives in {city}.",
    "Meet {name}, a {age}-year-old from {city}.",
    "{name} ({age}) moved to {city} last spring.",
    "Our new colleague {name} is {age} and works in {city}.",
    "At {age}, {name} still runs a small bakery in {city}.",
    "{name}, aged {age}, was born and raised in {city}.",
    "The customer, {name}, is {age} and lives in {city}.",
    "In {city}, {name} celebrated turning {age} yesterday.",
    "{name} from {city} just turned {age}.",
    "Registration: {name}, {age} years, resident of {city}.",
    "Yesterday {name}, who is {age}, flew home to {city}.",
    "{city} resident {name} is {age} years old.",
)
TEMPLATES_HELDOUT = (
    "{name}, {age}, has lived in {city} for a decade.",
    "Say hello to {name}: {age} years old, based in {city}.",
    "After years abroad, {name} ({age}) settled in {city}.",
    "The race was won by {name}, a {age}-year-old runner from {city}.",
    "{name} is a {age}-year-old teacher living in {city}.",
    "Now {age}, {name} paints murals across {city}.",
)
KEYS = ("name", "city", "age")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def generate(rng: random.Random, split: str) -> Example:
    first = rng.choice(pools(split, FIRST_NAMES, FIRST_NAMES_HELDOUT))
    name = f"{first} {rng.choice(pools(split, LAST_NAMES, LAST_NAMES_HELDOUT))}"
    city, age = rng.choice(pools(split, CITY, CITY_HELDOUT)), rng.randint(18, 89)
    prompt = rng.choice(pools(split, TEMPLATES, TEMPLATES_HELDOUT)).format(name=name, city=city, age=age)
    return Example(prompt, json.dumps({"name": name, "city": city, "age": age}))


def score(output: str, example: Example) -> bool:
    """The whole output is one JSON object with exactly the keys name, city, age and the right values."""
    try:
        got = json.loads(output.strip())
    except json.JSONDecodeError:
        return False
    return isinstance(got, dict) and tuple(got) == KEYS and got == json.loads(example.answer)


TASK = Task(
    name="json-extract",
    summary='Answers with the JSON object {"name", "city", "age"} extracted from a sentence about a person.',
    data="One sentence naming a person, their city (94 cities) and age, from 12 templates; the answer is "
    "`json.dumps` of the fields (58 first names, 44 surnames). Held-out prompts use 6 other templates and first "
    "names, surnames and 20 cities never seen in training.",
    generate=generate,
    score=score,
    adapter=AdapterSpec(rank=16, alpha=32, targets=ALL_LINEAR),
    train=TrainSpec(steps=100, lr=1e-3, num_examples=600),
    max_new_tokens=40,
)
