"""Pre-flight callbacks inside real trainers: a transformers `Trainer` and a Lightning
`Trainer`, each training a tiny model on the CPU for a few steps."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers.Trainer needs it

from precision_doctor.integrations import PreflightFailed  # noqa: E402

VOCAB, SEQ, N = 64, 8, 12
STEPS = 3
pytestmark = pytest.mark.slow


def tiny_gpt2(faulty: bool) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=SEQ,
        n_embd=32,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(cfg)
    if faulty:
        with torch.no_grad():  # the MLP hidden layer reaches ~1e5: beyond fp16 max 65504
            model.transformer.h[0].mlp.c_fc.weight.mul_(4e5)  # weights stay < 65504
    return model


def token_dataset() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (N, SEQ), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


def train_hf(tmp_path: Any, model: Any, callback: Any, **extra: Any) -> Any:
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        **extra,
    )
    trainer = Trainer(model=model, args=args, train_dataset=token_dataset(), callbacks=[callback])
    trainer.train()
    return trainer


def test_transformers_callback_stops_faulty_model(tmp_path: Any, caplog: Any) -> None:
    from precision_doctor.integrations.transformers import PreflightCallback

    cb = PreflightCallback(mode="stop", dtype="fp16", steps=2, plan=False)
    with caplog.at_level(logging.WARNING, logger="precision_doctor"):
        trainer = train_hf(tmp_path, tiny_gpt2(faulty=True), cb)
    assert cb.result is not None and not cb.result.go
    assert "OVERFLOW" in {r.risk for r in cb.result.reasons}
    assert any("mlp.c_fc" in (r.unit or "") for r in cb.result.reasons)
    assert trainer.state.global_step <= 1
    assert "NO-GO" in caplog.text and "OVERFLOW" in caplog.text


def test_transformers_callback_lets_healthy_model_run(tmp_path: Any) -> None:
    from precision_doctor.integrations.transformers import PreflightCallback

    model = tiny_gpt2(faulty=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cb = PreflightCallback(mode="stop", dtype="fp16", steps=2, plan=False)
    # The pre-flight itself must not move the weights: check right after it ran.
    seen: dict[str, bool] = {}

    class Probe(transformers.TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            seen["unchanged"] = all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=token_dataset(), callbacks=[cb, Probe()])
    trainer.train()
    assert cb.result is not None and cb.result.go, cb.result.verdict if cb.result else None
    assert seen["unchanged"]
    assert trainer.state.global_step == STEPS
    assert not cb.stopped


def test_transformers_callback_warn_and_raise_modes(tmp_path: Any) -> None:
    from precision_doctor.integrations.transformers import PreflightCallback

    warn = PreflightCallback(mode="warn", dtype="fp16", steps=1, plan=False)
    trainer = train_hf(tmp_path, tiny_gpt2(faulty=True), warn)
    assert warn.result is not None and not warn.result.go
    assert trainer.state.global_step == STEPS  # warned, ran on

    with pytest.raises(PreflightFailed) as e:
        train_hf(tmp_path, tiny_gpt2(faulty=True), PreflightCallback(mode="raise", dtype="fp16", steps=1, plan=False))
    assert not e.value.result.go


class _Regression(torch.nn.Module):
    """A Trainer model: a Linear fitted to targets 1e-3 from its own outputs, whose bf16
    error shows in the loss."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": (self.fc(x).float() - labels).pow(2).mean()}


def test_transformers_callback_fp32_reference_is_fp32_under_bf16_args(tmp_path: Any) -> None:
    """`bf16=True`: Accelerate binds an autocast wrapper as the model's forward before the
    callback runs. The pre-flight's fp32 run must not run through it (it did: its fp32 and
    bf16 losses were the same numbers, and the bf16 error went unseen)."""
    from transformers import Trainer, TrainingArguments

    from precision_doctor.integrations.transformers import PreflightCallback

    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 16, generator=g)
    with torch.no_grad():
        y = _Regression().fc(x) + 1e-3 * torch.randn(16, 16, generator=g)
    data = [{"x": x[i], "labels": y[i]} for i in range(16)]
    model = _Regression()
    cb = PreflightCallback(mode="warn", steps=1, plan=False)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=16, report_to=[], use_cpu=True,
        save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0, bf16=True,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=data, callbacks=[cb]).train()
    assert cb.result is not None and cb.result.dtype == "bf16"
    fp32, low = cb.result.runs["fp32"].losses[0], cb.result.runs["low"].losses[0]
    with torch.no_grad():
        exact = float(_Regression()(x, y)["loss"])
    # (The loss cancels heavily: one ulp of the outputs moves it ~1e-5; the bug was a >10% gap.)
    assert fp32 == pytest.approx(exact, rel=1e-3) and abs(low - fp32) > 0.1 * fp32, (fp32, low, exact)
    assert "forward" in vars(model)  # the trainer's wrapper (an instance attribute) is back in place


def test_a_model_the_trainer_holds_in_bf16_is_preflown_in_the_pure_regime(tmp_path: Any) -> None:
    """A model handed to the Trainer as `.to(torch.bfloat16)` trains pure bf16: pre-flown as an
    fp32 copy in the pure regime (it raised "needs the fp32 model" and ended the run, in
    mode "warn" too)."""
    from precision_doctor.integrations.transformers import PreflightCallback

    model = tiny_gpt2(faulty=False).to(torch.bfloat16)
    cb = PreflightCallback(mode="warn", steps=1, plan=False)
    trainer = train_hf(tmp_path, model, cb)
    assert cb.result is not None and cb.result.dtype == "bf16" and cb.result.regime == "pure"
    assert trainer.state.global_step == STEPS
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_callback_rejects_unknown_mode() -> None:
    from precision_doctor.errors import PrecisionDoctorError
    from precision_doctor.integrations.transformers import PreflightCallback

    with pytest.raises(PrecisionDoctorError, match="unknown callback mode"):
        PreflightCallback(mode="explode")


# --- Lightning ----------------------------------------------------------------------------


def _lightning() -> Any:
    return pytest.importorskip("lightning.pytorch")


def lightning_module(faulty: bool) -> Any:
    L = _lightning()

    class Regressor(L.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.inp = torch.nn.Linear(16, 64)
            self.out = torch.nn.Linear(64, 1)
            if faulty:
                with torch.no_grad():
                    self.inp.weight.mul_(1e5)  # weights < 65504, hidden values ~1e5: overflow fp16
                    self.out.weight.mul_(1e-5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.relu(self.inp(x)))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self(x), y)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    return Regressor()


def lightning_data() -> Any:
    g = torch.Generator().manual_seed(1)
    ds = torch.utils.data.TensorDataset(torch.randn(32, 16, generator=g), torch.randn(32, 1, generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=8)


def train_lightning(tmp_path: Any, module: Any, callback: Any, **extra: Any) -> Any:
    L = _lightning()
    trainer = L.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=[callback],
        **extra,
    )
    trainer.fit(module, lightning_data())
    return trainer


def test_lightning_callback_stops_faulty_model(tmp_path: Any) -> None:
    _lightning()
    from precision_doctor.integrations.lightning import LightningPreflightCallback

    cb = LightningPreflightCallback(mode="stop", dtype="fp16", steps=2, plan=False)
    trainer = train_lightning(tmp_path, lightning_module(faulty=True), cb)
    assert cb.result is not None and not cb.result.go
    assert any(r.risk == "OVERFLOW" and r.unit == "inp" for r in cb.result.reasons), [
        r.line() for r in cb.result.reasons
    ]
    assert trainer.global_step <= 1


def test_lightning_callback_lets_healthy_model_run(tmp_path: Any) -> None:
    _lightning()
    from precision_doctor.integrations.lightning import LightningPreflightCallback

    cb = LightningPreflightCallback(mode="stop", dtype="fp16", steps=2, plan=False)
    trainer = train_lightning(tmp_path, lightning_module(faulty=False), cb)
    assert cb.result is not None and cb.result.go, cb.result.verdict if cb.result else None
    assert cb.result.optimizer.startswith("build_optimizer: SGD")
    assert trainer.global_step == STEPS


def test_lightning_bf16_true_is_preflown_once_in_the_pure_regime(tmp_path: Any) -> None:
    """precision="bf16-true": the module's weights and batch are bf16, so the pre-flight runs
    an fp32 copy on the batch's values in the pure regime, once (a pre-flight that could not
    run was tried again on every batch)."""
    _lightning()
    from precision_doctor.integrations.lightning import LightningPreflightCallback

    cb = LightningPreflightCallback(mode="warn", steps=1, plan=False)
    trainer = train_lightning(tmp_path, lightning_module(faulty=False), cb, precision="bf16-true")
    assert cb.result is not None and cb.result.dtype == "bf16" and cb.result.regime == "pure"
    assert trainer.global_step == STEPS
