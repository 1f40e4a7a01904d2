"""The Figure 5 toy: SeqKD covers the teacher's modes, GAD seeks one (measured, 3 seeds)."""

from pathlib import Path

import pytest
import torch

from gad.config.load import ConfigError
from gad.methods import toy


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One run of the default toy (seeds 0, 1, 2), shared by the tests: it takes seconds."""
    out = tmp_path_factory.mktemp("toy")
    return toy.run(toy.ToyConfig(output_dir=str(out), seed=0, num_seeds=3), verbose=False)


def test_teacher_is_a_normalised_two_mode_mixture() -> None:
    teacher_k = toy.teacher_probs(toy.ToyConfig())
    assert teacher_k.shape == (10,)
    assert float(teacher_k.sum()) == pytest.approx(1.0)
    # Each mode holds half the mass within ±1 of its centre; the gap between them is empty.
    assert toy.mode_masses(teacher_k, [2.0, 7.0]) == pytest.approx([0.5, 0.5], abs=0.01)
    assert float(teacher_k[4:6].sum()) < 1e-3


def test_seqkd_covers_all_modes(result: dict) -> None:
    widest_mode_std = max(result["teacher_mode_stds"])
    for row in result["stats"]["SeqKD"]:
        # Far wider than any teacher mode: one Gaussian stretched over both of them.
        assert row["std"] > 4 * widest_mode_std
        # Near uniform over 10 categories (log 10 = 2.30) and no mode holds half the mass.
        assert row["entropy"] > 2.1
        assert row["mass_in_mode"] < 0.4


def test_gad_seeks_one_mode(result: dict) -> None:
    seqkd_entropy = min(row["entropy"] for row in result["stats"]["SeqKD"])
    for row in result["stats"]["GAD"]:
        assert row["mass_in_mode"] > 0.9
        assert row["entropy"] < seqkd_entropy - 1.0
        # About as wide as one teacher mode, not collapsed far past it.
        assert row["std"] < 2 * max(result["teacher_mode_stds"])


def test_exact_references_seek_and_cover(result: dict) -> None:
    (rev,) = result["stats"]["reverse-KL ref"]
    (fwd,) = result["stats"]["forward-KL ref"]
    assert rev["mass_in_mode"] > 0.9 and rev["entropy"] < 1.0
    assert fwd["mass_in_mode"] < 0.4 and fwd["entropy"] > 2.1
    # GAD lands where exact reverse-KL descent does, SeqKD where forward-KL descent does.
    for gad_k in result["gad"]:
        assert torch.tensor(gad_k).sub(torch.tensor(result["reverse_kl"])).abs().max() < 0.15
    for seqkd_k in result["seqkd"]:
        assert torch.tensor(seqkd_k).sub(torch.tensor(result["forward_kl"])).abs().max() < 0.03


def test_gad_without_discriminator_updates_does_not_move() -> None:
    # No D update: every reward is 0, every advantage 0, so the student keeps its init.
    config = toy.ToyConfig(d_steps=0, steps=20)
    probs_k = toy.train_gad(config, seed=0)
    mean, log_std = toy._student_params(config)
    init_k = toy.gaussian_probs(mean.detach(), log_std.detach(), config.num_categories)
    assert torch.allclose(probs_k, init_k)


def test_png_and_json_are_written(result: dict) -> None:
    png = Path(result["png"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000
    assert Path(result["json"]).is_file()
    assert len(result["seqkd"]) == len(result["gad"]) == 3


@pytest.mark.parametrize(
    "bad",
    [dict(n_samples=1), dict(teacher_modes="2,7", teacher_weights="1"), dict(teacher_std=0.0)],
)
def test_bad_settings_are_rejected(bad: dict) -> None:
    with pytest.raises(ConfigError):
        toy.validate(toy.ToyConfig(**bad))
