"""The demo proves its point every time: the same command gives the same weights, and digits are not mirrored."""

from conftest import REPO

from selfsup.checkpoint import read_meta
from selfsup.config import load_config
from selfsup.ssl.settings import PretrainConfig
from selfsup.ssl.train import train

DEMO = REPO / "configs" / "pretrain" / "digits_cpu.yaml"


def test_two_runs_of_the_demo_recipe_export_identical_weights(tmp_path):
    digests = []
    for run in ("a", "b"):
        config = load_config(
            PretrainConfig,
            DEMO,
            [f"out={tmp_path / run}", "max_steps=3", "monitor_every=0", "progress_bar=false", "resume=never"],
        )
        digests.append(read_meta(train(config).backbone).weights_sha256)
    assert digests[0] == digests[1]


def test_the_demo_does_not_flip_digits():
    assert load_config(PretrainConfig, DEMO).augment.flip_prob == 0.0
