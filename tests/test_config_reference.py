"""docs/CONFIGURATION.md is what `python -m unsloth_dist.config_reference` generates from the pydantic
models, every field has a description, and the cross-field rules it lists are the ones enforced."""
from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import BaseModel, Field

from conftest import ROOT
from unsloth_dist import config as C
from unsloth_dist import config_reference as R
from unsloth_dist.data.config import DataConfig

DOC = ROOT / "docs" / "CONFIGURATION.md"


def test_reference_is_up_to_date():
    assert DOC.is_file(), "docs/CONFIGURATION.md is missing: run `python -m unsloth_dist.config_reference`"
    assert DOC.read_text() == R.render(), (
        "docs/CONFIGURATION.md differs from what the models generate: run `python -m unsloth_dist.config_reference`"
    )


def test_every_field_has_a_description():
    assert R.missing_descriptions() == [], "add description= to these fields (unsloth_dist/config.py, data/config.py)"


def test_missing_description_is_detected():
    class Probe(BaseModel):
        described: int = Field(1, description="something")
        bare: int = 2
        blank: str = Field("x", description="  ")

    assert R.missing_descriptions([("", Probe)]) == ["Probe.bare", "Probe.blank"]


def test_every_model_and_field_is_in_the_document():
    text = R.render()
    documented = {cls for _, cls in R.all_models()}
    assert {C.TrainConfig, C.SingleConfig, C.DDPConfig, C.FSDPConfig, C.ZeroConfig, C.AutoConfig, DataConfig} <= documented
    for name in C.BACKEND_NAMES:
        assert f"`{name}`" in text.split("## backend", 1)[1], name
    for prefix, model in R.all_models():
        for field in model.model_fields:
            assert f"| `{prefix}{field}` |" in text, f"{prefix}{field} is not in the reference"


def test_rows_show_type_default_and_constraints():
    text = R.render()
    assert "| `adam_beta1` | number | `0.9` | ≥ 0; < 1 |" in text
    assert "| `backend.sharding` | `full` \\| `grad_op` \\| `hybrid` \\| `none` | `full` |" in text
    assert "| `backend.stage3_prefetch_bucket_size` | integer | `50000000` | > 0; zero3 only |" in text
    assert "| `data.max_seq_length` | integer | `2048` | > 1 |" in text
    assert "`cosine_with_min_lr`" in text  # the scheduler names come from config._SCHEDULERS
    assert "| `backend` | backend (below) | `auto` |" in text


@pytest.mark.parametrize("text, example, message", R.CROSS_FIELD_RULES, ids=[r[2][:40] for r in R.CROSS_FIELD_RULES])
def test_listed_cross_field_rules_are_enforced(text, example, message):
    with pytest.raises(C.ConfigError) as err:
        C.load_config(dict(example))
    assert message in str(err.value)


def test_global_batch_startup_check_is_real():
    cfg = C.load_config(None, max_steps=1, per_device_train_batch_size=2, global_batch_size=8)
    cfg.check_world_size(4)
    with pytest.raises(C.ConfigError, match="set gradient_accumulation_steps to 2"):
        cfg.check_world_size(2)


def test_check_mode_of_the_command(tmp_path):
    out = tmp_path / "CONFIGURATION.md"
    cmd = [sys.executable, "-m", "unsloth_dist.config_reference", "--output", str(out)]
    missing = subprocess.run([*cmd, "--check"], capture_output=True, text=True, cwd=ROOT)
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    assert subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT).returncode == 0
    assert out.read_text() == R.render()
    assert subprocess.run([*cmd, "--check"], capture_output=True, text=True, cwd=ROOT).returncode == 0
    out.write_text(out.read_text().replace("Seeds torch", "Seeds numpy"))
    stale = subprocess.run([*cmd, "--check"], capture_output=True, text=True, cwd=ROOT)
    assert stale.returncode == 1 and "python -m unsloth_dist.config_reference" in stale.stderr
