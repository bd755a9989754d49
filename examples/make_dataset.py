"""Generate the small instruction datasets shipped in examples/data/ (Apache-2.0, like the project).

Every row is written by this program from a seeded random generator, and every answer is
computed (arithmetic, unit conversions, string manipulation, number facts, calendar questions,
base conversion), so the data is original and verifiably correct. Re-running it reproduces the
files byte for byte:

    python examples/make_dataset.py            # writes examples/data/instructions.jsonl, chat.jsonl
    python examples/make_dataset.py --check    # regenerates in memory and compares
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import random
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "data"
SEED = 20240601
N_INSTRUCTIONS = 320
N_CHATS = 160

WORDS = ["apple", "river", "mountain", "window", "garden", "pencil", "orange", "planet", "rocket", "silver",
         "thunder", "library", "journey", "kitchen", "blanket", "harbor", "meadow", "lantern", "compass", "violin",
         "anchor", "bridge", "candle", "desert", "engine", "forest", "guitar", "island", "jacket", "marble"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def fmt_num(x: float, places: int = 2) -> str:
    s = f"{x:.{places}f}".rstrip("0").rstrip(".")
    return s if s != "-0" else "0"


def is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


# ---------------------------------------------------------------- single tasks: (instruction, input, output)


def t_add(r):
    a, b = r.randint(10, 999), r.randint(10, 999)
    return "Add the two numbers.", f"{a} and {b}", f"{a} + {b} = {a + b}."


def t_sub(r):
    a, b = r.randint(100, 999), r.randint(1, 99)
    return f"What is {a} minus {b}?", "", f"{a} - {b} = {a - b}."


def t_mul(r):
    a, b = r.randint(2, 99), r.randint(2, 99)
    return "Multiply these numbers.", f"{a} x {b}", f"{a} x {b} = {a * b}."


def t_divmod(r):
    a, b = r.randint(20, 500), r.randint(2, 19)
    q, m = divmod(a, b)
    return (f"Divide {a} by {b} and give the quotient and the remainder.", "",
            f"{a} = {b} x {q} + {m}, so the quotient is {q} and the remainder is {m}.")


def t_km_miles(r):
    km = r.randint(1, 300)
    return f"Convert {km} kilometres to miles.", "", f"{km} km is about {fmt_num(km / 1.609344)} miles (1 mile = 1.609344 km)."


def t_miles_km(r):
    mi = r.randint(1, 200)
    return f"How many kilometres are {mi} miles?", "", f"{mi} miles is about {fmt_num(mi * 1.609344)} km."


def t_kg_lb(r):
    kg = r.randint(1, 150)
    return f"Convert {kg} kg to pounds.", "", f"{kg} kg is about {fmt_num(kg / 0.45359237)} lb (1 lb = 0.45359237 kg)."


def t_c_f(r):
    c = r.randint(-30, 45)
    return f"Convert {c} degrees Celsius to Fahrenheit.", "", f"{c} C = {fmt_num(c * 9 / 5 + 32, 1)} F (F = C x 9/5 + 32)."


def t_f_c(r):
    f = r.randint(-10, 110)
    return f"Convert {f} degrees Fahrenheit to Celsius.", "", f"{f} F = {fmt_num((f - 32) * 5 / 9, 1)} C (C = (F - 32) x 5/9)."


def t_hours(r):
    h, m = r.randint(1, 23), r.randint(0, 59)
    return f"How many minutes are {h} hours and {m} minutes?", "", f"{h} x 60 + {m} = {h * 60 + m} minutes."


def t_reverse(r):
    w = r.choice(WORDS)
    return "Reverse the letters of the word.", w, f"{w} reversed is {w[::-1]}."


def t_upper(r):
    ws = " ".join(r.sample(WORDS, 3))
    return "Rewrite the text in upper case.", ws, ws.upper()


def t_vowels(r):
    w = r.choice(WORDS)
    n = sum(c in "aeiou" for c in w)
    return f"How many vowels are in the word \"{w}\"?", "", f"\"{w}\" has {n} vowel{'s' if n != 1 else ''}."


def t_length(r):
    w = r.choice(WORDS)
    return f"How many letters does \"{w}\" have?", "", f"\"{w}\" has {len(w)} letters."


def t_sort_words(r):
    ws = r.sample(WORDS, r.randint(3, 6))
    return "Sort these words alphabetically.", ", ".join(ws), ", ".join(sorted(ws))


def t_prime(r):
    n = r.randint(2, 200)
    if is_prime(n):
        return f"Is {n} a prime number?", "", f"Yes, {n} is prime: its only divisors are 1 and {n}."
    d = next(d for d in range(2, n) if n % d == 0)
    return f"Is {n} a prime number?", "", f"No, {n} is not prime: {n} = {d} x {n // d}."


def t_parity(r):
    n = r.randint(0, 10_000)
    return f"Is {n} even or odd?", "", f"{n} is {'even' if n % 2 == 0 else 'odd'}."


def t_gcd(r):
    a, b = r.randint(4, 300), r.randint(4, 300)
    return f"What is the greatest common divisor of {a} and {b}?", "", f"gcd({a}, {b}) = {math.gcd(a, b)}."


def t_lcm(r):
    a, b = r.randint(2, 40), r.randint(2, 40)
    return f"What is the least common multiple of {a} and {b}?", "", f"lcm({a}, {b}) = {a * b // math.gcd(a, b)}."


def t_factorial(r):
    n = r.randint(0, 12)
    return f"Compute {n} factorial.", "", f"{n}! = {math.factorial(n)}."


def _date(r) -> dt.date:
    return dt.date(2000, 1, 1) + dt.timedelta(days=r.randint(0, 365 * 40))


def t_weekday(r):
    d = _date(r)
    return f"What day of the week was {d.isoformat()}?", "", f"{d.isoformat()} was a {WEEKDAYS[d.weekday()]}."


def t_days_between(r):
    a = _date(r)
    b = a + dt.timedelta(days=r.randint(1, 1000))
    return (f"How many days are there from {a.isoformat()} to {b.isoformat()}?", "",
            f"From {a.isoformat()} to {b.isoformat()} there are {(b - a).days} days.")


def t_list_stats(r):
    xs = [r.randint(-50, 99) for _ in range(r.randint(3, 7))]
    return ("Give the sum, the smallest and the largest of these numbers.", ", ".join(map(str, xs)),
            f"Sum: {sum(xs)}. Smallest: {min(xs)}. Largest: {max(xs)}.")


def t_sort_numbers(r):
    xs = [r.randint(-50, 99) for _ in range(r.randint(3, 8))]
    return "Sort the numbers from smallest to largest.", ", ".join(map(str, xs)), ", ".join(map(str, sorted(xs)))


def t_binary(r):
    n = r.randint(1, 1023)
    return f"Write {n} in binary.", "", f"{n} in binary is {n:b}."


def t_hex(r):
    n = r.randint(16, 65535)
    return f"Write {n} in hexadecimal.", "", f"{n} in hexadecimal is 0x{n:X}."


TASKS = [t_add, t_sub, t_mul, t_divmod, t_km_miles, t_miles_km, t_kg_lb, t_c_f, t_f_c, t_hours, t_reverse, t_upper,
         t_vowels, t_length, t_sort_words, t_prime, t_parity, t_gcd, t_lcm, t_factorial, t_weekday, t_days_between,
         t_list_stats, t_sort_numbers, t_binary, t_hex]

# ---------------------------------------------------------------- multi-turn chats

SYSTEMS = ["You are a careful assistant that answers with exact numbers.",
           "You are a concise assistant.", ""]


def c_arith_chain(r):
    a, b, c = r.randint(2, 30), r.randint(2, 30), r.randint(1, 100)
    p = a * b
    return [("user", f"What is {a} times {b}?"), ("assistant", f"{a} x {b} = {p}."),
            ("user", f"And if you add {c} to that?"), ("assistant", f"{p} + {c} = {p + c}."),
            ("user", "Is the result even?"),
            ("assistant", f"{p + c} is {'even' if (p + c) % 2 == 0 else 'odd'}, so {'yes' if (p + c) % 2 == 0 else 'no'}.")]


def c_word(r):
    w = r.choice(WORDS)
    n = sum(ch in "aeiou" for ch in w)
    return [("user", f"Spell \"{w}\" backwards."), ("assistant", f"{w[::-1]}"),
            ("user", "How many vowels does the original word have?"),
            ("assistant", f"\"{w}\" has {n} vowel{'s' if n != 1 else ''}.")]


def c_trip(r):
    km = r.randint(20, 400)
    speed = r.choice([40, 50, 60, 80, 100])
    minutes = round(km / speed * 60)
    return [("user", f"A trip is {km} km long. How long is it in miles?"),
            ("assistant", f"{km} km is about {fmt_num(km / 1.609344)} miles."),
            ("user", f"How long does it take at {speed} km/h?"),
            ("assistant", f"{km} / {speed} = {fmt_num(km / speed)} hours, about {minutes // 60} h {minutes % 60} min.")]


def c_date(r):
    d = _date(r)
    k = r.randint(1, 60)
    e = d + dt.timedelta(days=k)
    return [("user", f"What weekday was {d.isoformat()}?"), ("assistant", f"It was a {WEEKDAYS[d.weekday()]}."),
            ("user", f"What date is {k} days later, and which weekday is it?"),
            ("assistant", f"{k} days after {d.isoformat()} is {e.isoformat()}, a {WEEKDAYS[e.weekday()]}.")]


def c_numbers(r):
    xs = [r.randint(1, 60) for _ in range(r.randint(4, 6))]
    g = xs[0]
    for x in xs[1:]:
        g = math.gcd(g, x)
    return [("user", f"Sort these numbers: {', '.join(map(str, xs))}."),
            ("assistant", ", ".join(map(str, sorted(xs)))),
            ("user", "What is their sum?"), ("assistant", f"The sum is {sum(xs)}."),
            ("user", "And their greatest common divisor?"), ("assistant", f"Their greatest common divisor is {g}.")]


CHATS = [c_arith_chain, c_word, c_trip, c_date, c_numbers]


def generate() -> dict[str, str]:
    r = random.Random(SEED)
    rows, seen = [], set()
    while len(rows) < N_INSTRUCTIONS:
        instruction, inp, output = r.choice(TASKS)(r)
        if (instruction, inp) in seen:
            continue
        seen.add((instruction, inp))
        rows.append({"instruction": instruction, "input": inp, "output": output})
    chats = []
    for _ in range(N_CHATS):
        turns = r.choice(CHATS)(r)
        system = r.choice(SYSTEMS)
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": role, "content": text} for role, text in turns]
        chats.append({"messages": msgs})
    dump = lambda xs: "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in xs)  # noqa: E731
    return {"instructions.jsonl": dump(rows), "chat.jsonl": dump(chats)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare with the files on disk instead of writing")
    args = ap.parse_args()
    files = generate()
    if args.check:
        bad = [n for n, text in files.items() if not (OUT / n).is_file() or (OUT / n).read_text() != text]
        if bad:
            print(f"differs from the generator: {', '.join(bad)}", file=sys.stderr)
            return 1
        print("examples/data matches the generator")
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (OUT / name).write_text(text)
        print(f"wrote {OUT / name} ({text.count(chr(10))} rows, {len(text.encode())} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
