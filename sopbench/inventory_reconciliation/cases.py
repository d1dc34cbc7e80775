"""The cases of inventory_reconciliation: the rows of each warehouse database, and their check.

:func:`generate_inputs` draws one case's tables (JSON-serialisable rows) from the ``rng`` it is
given and nothing else, so the cases are identical on every run and machine; :func:`input_problem`
says why an ``inputs`` object read from a cases file could not build a database.
"""

from __future__ import annotations

import random
import re
from typing import Any

KINDS = ("receipt", "shipment", "transfer_in", "transfer_out", "adjustment")

#: Columns of each table, in schema order (rows in ``inputs`` are objects with these keys).
COLUMNS: dict[str, tuple[str, ...]] = {
    "products": ("sku", "description", "unit_cost"),
    "ledger": ("entry_id", "sku", "warehouse", "qty_change", "kind", "posted"),
    "cycle_counts": ("sku", "warehouse", "counted_qty", "count_date"),
}

_DESCRIPTIONS = (
    "hex bolt M8 (box of 100)",
    "stretch wrap 500 mm",
    "pallet label roll",
    "safety gloves size L",
    "cable ties 300 mm",
    "corrugated box 40x30x30",
    "packing tape 48 mm",
    "LED work lamp",
    "hydraulic hose 1 m",
    "nitrile seal kit",
    "bearing 6204-2RS",
    "steel shelf bracket",
    "forklift battery cap",
    "barcode scanner strap",
    "anti-slip floor mat",
    "drum pump adaptor",
    "wooden pallet EUR",
    "fuse 10 A (pack of 10)",
)
_UNIT_COSTS = (2, 3, 4, 5, 6, 8, 9, 12, 15, 18, 24, 29, 35, 42, 55, 68, 85, 120, 150, 210)

_WH_RE = re.compile(r"^WH-\d+$")
_SKU_RE = re.compile(r"^SKU-\d{4}$")
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


# -- the case generator ---------------------------------------------------------------------------
def _movement(rng: random.Random, on_hand: int) -> tuple[str, int]:
    """One ledger movement after the opening receipt: (kind, signed quantity)."""
    kind = rng.choices(KINDS, weights=(2, 5, 1, 1, 1))[0]
    if kind == "receipt":
        return kind, rng.randint(5, 60)
    if kind == "transfer_in":
        return kind, rng.randint(2, 30)
    if kind == "adjustment":
        return kind, rng.choice([-4, -3, -2, -1, 1, 2, 3, 4])
    return kind, -rng.randint(1, max(1, on_hand // 3))


def _count_delta(rng: random.Random) -> int:
    """Counted minus system for one SKU: mostly zero or small, sometimes a real loss or find."""
    r = rng.random()
    if r < 0.45:
        return 0
    if r < 0.8:
        return rng.choice([-3, -2, -1, 1, 2, 3])
    return rng.choice([-1, 1]) * rng.randint(4, 15)


def generate_inputs(rng: random.Random) -> dict[str, Any]:
    """A case's rows (JSON-serialisable), drawn from ``rng`` only."""
    warehouses = [f"WH-{n}" for n in sorted(rng.sample(range(1, 10), rng.choice([2, 3])))]
    target = rng.choice(warehouses)
    skus = [f"SKU-{n}" for n in sorted(rng.sample(range(1000, 10000), rng.randint(6, 12)))]
    descriptions = rng.sample(_DESCRIPTIONS, len(skus))
    products = [
        {"sku": s, "description": d, "unit_cost": rng.choice(_UNIT_COSTS)}
        for s, d in zip(skus, descriptions, strict=True)
    ]

    stocked = [(s, target) for s in skus if rng.random() < 0.85]
    if len(stocked) < 5:
        stocked = [(s, target) for s in skus[:5]]
    others = [w for w in warehouses if w != target]
    stocked += [(s, w) for w in others for s in skus if rng.random() < 0.35]

    # Movements: an opening receipt per stocked pair, then random movements up to the row budget,
    # twice as likely in the warehouse under reconciliation.
    posted_qty: dict[tuple[str, str], int] = {}
    moves: list[tuple[str, str, int, str, int]] = []
    for pair in stocked:
        qty = rng.randint(20, 150)
        moves.append((pair[0], pair[1], qty, "receipt", 1))
        posted_qty[pair] = qty
    weights = [2 if w == target else 1 for _, w in stocked]
    budget = rng.randint(max(20, len(moves) + 6), 50)
    while len(moves) < budget:
        sku, wh = rng.choices(stocked, weights=weights)[0]
        kind, qty = _movement(rng, posted_qty[(sku, wh)])
        posted = int(rng.random() >= 0.12)
        moves.append((sku, wh, qty, kind, posted))
        if posted:
            posted_qty[(sku, wh)] += qty
    opening, later = moves[: len(stocked)], moves[len(stocked) :]
    rng.shuffle(opening)
    first_id = rng.randint(1000, 8000)
    columns = COLUMNS["ledger"]
    ledger = [
        dict(zip(columns, (first_id + i, *move), strict=True))
        for i, move in enumerate(opening + later)
    ]

    # Cycle counts: most stocked SKUs of the target, now and then a SKU found where the books
    # hold none, some recounts (an earlier, superseded count), and a few counts elsewhere.
    in_scope = [s for s, w in stocked if w == target and rng.random() < 0.9]
    if len(in_scope) < 4:
        in_scope = [s for s, w in stocked if w == target][:4]
    unstocked = [s for s in skus if (s, target) not in posted_qty]
    if unstocked and rng.random() < 0.15:
        in_scope.append(rng.choice(unstocked))
    deltas = {s: _count_delta(rng) for s in in_scope}
    if not any(deltas.values()):
        deltas[rng.choice(in_scope)] = rng.choice([-2, -1, 1, 2])
    day = rng.randint(10, 28)
    month = rng.randint(1, 12)
    counts = []
    for s in sorted(in_scope):
        system = posted_qty.get((s, target), 0)
        counted = system + deltas[s]
        if counted < 0:  # a shelf cannot hold less than nothing: flip the shortfall
            counted = max(0, system - deltas[s])
        if rng.random() < 0.2:
            earlier = max(0, system + _count_delta(rng))
            counts.append(_count(s, target, earlier, month, day - rng.randint(1, 9)))
        counts.append(_count(s, target, counted, month, day))
    for s, w in stocked:
        if w != target and rng.random() < 0.5:
            counts.append(_count(s, w, max(0, posted_qty[(s, w)] + _count_delta(rng)), month, day))
    return {"warehouse": target, "products": products, "ledger": ledger, "cycle_counts": counts}


def _count(sku: str, warehouse: str, qty: int, month: int, day: int) -> dict[str, Any]:
    return {
        "sku": sku,
        "warehouse": warehouse,
        "counted_qty": qty,
        "count_date": f"2024-{month:02d}-{day:02d}",
    }


# -- checking a cases file ------------------------------------------------------------------------
_FIELD_RULES: dict[str, dict[str, type]] = {
    "products": {"sku": str, "description": str, "unit_cost": int},
    "ledger": {
        "entry_id": int,
        "sku": str,
        "warehouse": str,
        "qty_change": int,
        "kind": str,
        "posted": int,
    },
    "cycle_counts": {"sku": str, "warehouse": str, "counted_qty": int, "count_date": str},
}


def input_problem(inputs: dict[str, Any]) -> str | None:
    """Why ``inputs`` cannot build a reconciliation database, or ``None``."""
    wh = inputs.get("warehouse")
    if not isinstance(wh, str) or not _WH_RE.match(wh):
        return "'warehouse' must be a warehouse id such as \"WH-3\""
    for table, rules in _FIELD_RULES.items():
        rows = inputs.get(table)
        if not isinstance(rows, list):
            return f"'{table}' must be a list of rows"
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                return f"'{table}[{i}]' must be an object"
            for key, kind in rules.items():
                value = row.get(key)
                if not isinstance(value, kind) or isinstance(value, bool):
                    name = "an integer" if kind is int else "a string"
                    return f"'{table}[{i}].{key}' must be {name}"
    skus = {p["sku"] for p in inputs["products"]}
    if len(skus) != len(inputs["products"]):
        return "'products' has a duplicate sku"
    for i, p in enumerate(inputs["products"]):
        if not _SKU_RE.match(p["sku"]):
            return f"'products[{i}].sku' must look like \"SKU-4821\""
    ids = [e["entry_id"] for e in inputs["ledger"]]
    if len(set(ids)) != len(ids):
        return "'ledger' has a duplicate entry_id"
    for i, e in enumerate(inputs["ledger"]):
        if e["sku"] not in skus:
            return f"'ledger[{i}].sku' is not a product"
        if e["kind"] not in KINDS:
            return f"'ledger[{i}].kind' must be one of {', '.join(KINDS)}"
        if e["posted"] not in (0, 1):
            return f"'ledger[{i}].posted' must be 0 or 1"
    for i, c in enumerate(inputs["cycle_counts"]):
        if c["sku"] not in skus:
            return f"'cycle_counts[{i}].sku' is not a product"
        if c["counted_qty"] < 0:
            return f"'cycle_counts[{i}].counted_qty' must not be negative"
        if not _DATE_RE.match(c["count_date"]):
            return f"'cycle_counts[{i}].count_date' must be a date YYYY-MM-DD"
    if not any(c["warehouse"] == wh for c in inputs["cycle_counts"]):
        return f"'cycle_counts' has no count for warehouse {wh}"
    return None
