"""``--set KEY=VALUE`` for the measurement scripts: recipe keys replaced on every recipe a script
loads, the value read as YAML (``--set broad=off --set augment=false`` reproduces the tables
measured before broad texts were a default).  Validated like a recipe key: a bad key or value is
the recipe's one-line error."""

from __future__ import annotations

import argparse

import yaml

from transmute_cli.recipe.schema import parse_recipe


def add_argument(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="replace a recipe key on every recipe (YAML value), e.g. --set broad=off")


def parse(sets: list[str]) -> dict:
    """The overrides as recipe values, checked by parsing a recipe that states them."""
    if not sets:
        return {}
    data = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        data[key.strip()] = yaml.safe_load(value)
    if any(k.endswith("_file") for k in data):
        raise SystemExit("--set: a *_file key cannot be set here; set the key it fills (examples, eval, ...)")
    # enough examples that batches / demonstrations up to 63 are not refused by the probe itself
    probe = parse_recipe(yaml.safe_dump({"instruction": "x", "examples": [[f"a{i}", "b"] for i in range(64)], **data}),
                         source="--set")
    return {k: getattr(probe, k) for k in data}
