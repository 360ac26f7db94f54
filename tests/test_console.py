"""The console shows Trellis's own lines and real warnings, not the import noise of the libraries it
loads (trellis.core.console; issue 16)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import run_script

# What every process printed before its own lines: torchao's GPU kernels failing to load, torch's
# pytree deprecation for torchao's enums, bitsandbytes' optional Hub kernel, and the TRL warnings
# Trellis's imports and recipes trigger (the pad_token one once per recipe).
NOISE = (
    "_C_mxfp8",
    "_C_cutlass_90a",
    "is an Enum subclass and is now natively supported",
    "gemm_4bit_forward from kernels-community",
    "You are importing from 'trl.experimental'",
    "`pad_token` is deprecated",
    "`gradient_checkpointing` is deprecated",
)


def assert_no_noise(output: str) -> None:
    heard = [line for line in output.splitlines() if any(message in line for message in NOISE)]
    assert not heard, "library import noise on the console:\n" + "\n".join(heard)


def test_validate_prints_its_verdicts_only(workdir):
    # sft: the tiny recipe; orpo and ppo import trl.experimental; the Llama recipe sets `pad_token`.
    recipes = {
        "recipes/tiny/sft.yaml": "sft",
        "recipes/tiny/orpo.yaml": "orpo",
        "recipes/tiny/ppo.yaml": "ppo",
        "recipes/llama-3.2-1b/sft.yaml": "sft",
    }
    result = subprocess.run(
        [sys.executable, "-m", "trellis.cli", "validate", "--no-path-check", *recipes],
        cwd=workdir,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"ok   {path} ({stage})" for path, stage in recipes.items()]
    assert_no_noise(result.stderr)


def test_sft_start_is_quiet_but_a_real_deprecation_shows(workdir, tmp_path):
    # keep_end is deprecated by TRL with the same category, from the same parser, as `pad_token`:
    # the recipe's own deprecated choice must still be reported.
    result = run_script(
        [
            "sft.py",
            "--config",
            "recipes/tiny/sft.yaml",
            "--output_dir",
            str(tmp_path / "sft"),
            "--max_steps",
            "1",
            "--eval_before_training",
            "false",
            "--truncation_mode",
            "keep_end",
        ],
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert_no_noise(output)
    assert "The `'keep_end'` truncation mode is deprecated" in output
    assert "Saved the final model" in output


def test_user_code_keeps_the_same_libraries_warnings(tmp_path):
    """The filters match Trellis's triggers exactly: the same loggers and warnings from user code show."""
    script = tmp_path / "user.py"
    script.write_text(
        textwrap.dedent(
            """
            import enum
            import logging

            import torch.utils._pytree as pytree

            import trellis  # noqa: F401  (installs the filters)


            class Colour(str, enum.Enum):
                RED = "red"


            pytree.register_constant(Colour)  # torch deprecates this for a user's Enum too
            for name in ("torchao", "torch.utils._pytree", "bitsandbytes.backends.cpu.ops"):
                logging.getLogger(name).warning("another message on %s", name)
            from trl.experimental.orpo import ORPOConfig  # noqa: E402,F401
            """
        )
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "<enum 'Colour'> is an Enum subclass and is now natively supported" in result.stderr
    for name in ("torchao", "torch.utils._pytree", "bitsandbytes.backends.cpu.ops"):
        assert f"another message on {name}" in result.stderr
    assert "You are importing from 'trl.experimental'" in result.stderr
