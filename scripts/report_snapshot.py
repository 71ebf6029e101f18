"""Write every sample model's and test fixture's report JSON, or compare with a saved set.

A refactor that must not change behaviour is checked with it: run it at the commit before
(`python scripts/report_snapshot.py write /tmp/before`) and after (`... compare /tmp/before`).
The cases are the regimes, policies and dtypes the sample models' docstrings name, and the
shared fixtures (tests/fixtures.py) under the default regime in both dtypes. Fields that
describe the machine rather than the analysis (versions, wall times) are left out.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import precision_doctor as pd  # noqa: E402
from precision_doctor.model.spec import load_model_file  # noqa: E402

# The variants each sample docstring speaks of: both autocast op policies and the pure regime.
VARIANTS = [("autocast", "cuda"), ("autocast", "cpu"), ("pure", "cuda")]
DTYPES = ["fp16", "bf16"]
FIXTURES = [
    "mlp",
    "head_mlp",
    "cnn",
    "functional",
    "gpt2",
    "bert",
    "t5",
    "llama",
    "qwen2",
    "mistral",
    "swin",
    "one_token_lm",
    "amplifier",
    "deep_se",
]
VOLATILE = {"wall_s", "seconds", "elapsed_s", "torch_version", "tool_version", "python_version", "created"}


def _scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items() if k not in VOLATILE and not k.endswith("_seconds")}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


def cases() -> Iterator[tuple[str, Any]]:
    for path in sorted((ROOT / "sample_models").glob("*.py")):
        for regime, policy in VARIANTS:
            for dtype in DTYPES:
                name = f"{path.stem}-{regime}-{policy}-{dtype}"

                def run(path: Path = path, regime: str = regime, policy: str = policy, dtype: str = dtype) -> Any:
                    spec = load_model_file(path)
                    return pd.analyze(
                        spec.model, spec.batch, spec.loss_fn, dtype=dtype, regime=regime, policy=policy, name=spec.name
                    )

                yield name, run
    from tests import fixtures

    for fixture in FIXTURES:
        for dtype in DTYPES:

            def run_fixture(fixture: str = fixture, dtype: str = dtype) -> Any:
                case = getattr(fixtures, f"build_{fixture}")()
                return pd.analyze(case.model, case.batch, case.loss_fn, dtype=dtype, name=fixture)

            yield f"fixture-{fixture}-{dtype}", run_fixture


def snapshot(run: Any) -> str:
    torch.manual_seed(0)
    report = run()
    return json.dumps(_scrub(json.loads(report.to_json())), indent=1, sort_keys=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("action", choices=["write", "compare"])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--only", default="", help="substring of the case names to run")
    args = parser.parse_args()
    args.directory.mkdir(parents=True, exist_ok=True)
    differ = []
    for name, run in cases():
        if args.only not in name:
            continue
        text = snapshot(run)
        target = args.directory / f"{name}.json"
        if args.action == "write":
            target.write_text(text)
        elif not target.exists() or target.read_text() != text:
            differ.append(name)
            (args.directory / f"{name}.after.json").write_text(text)
        print(name, "differs" if name in differ else "ok", flush=True)
    if differ:
        print(f"{len(differ)} report(s) differ: {', '.join(differ)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
