"""One command-line rule in every stage: a ``key=value`` wins over the flag for the same key, wherever
either stands (``selfsup.config.parse_command``). Each stage's parser is called in-process; nothing trains."""

import pytest

from selfsup.compress import cli as compress_cli
from selfsup.compress.settings import CompressConfig
from selfsup.config import load_config
from selfsup.errors import UsageError
from selfsup.eval import cli as probe_cli
from selfsup.eval.probe import ProbeConfig
from selfsup.finetune import cli as finetune_cli
from selfsup.finetune.settings import FinetuneConfig
from selfsup.ssl import cli as pretrain_cli
from selfsup.ssl.settings import PretrainConfig
from selfsup.tta import cli as tta_cli
from selfsup.tta.settings import TTAConfig

STAGES = {
    "pretrain": (pretrain_cli.parse_args, PretrainConfig),
    "probe": (probe_cli.parse_args, ProbeConfig),
    "finetune": (finetune_cli.parse_args, FinetuneConfig),
    "tta": (tta_cli.parse_args, TTAConfig),
    "compress": (compress_cli.parse_args, CompressConfig),
}
FLAGS = ["--mixed-precision", "bf16", "--dataset", "from-the-flag"]
PAIRS = ["mixed_precision=no", "dataset=from-the-pair"]


def parsed(stage: str, argv: list[str]):
    parse, config_class = STAGES[stage]
    return load_config(config_class, *parse(argv))


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("argv", [FLAGS + PAIRS, PAIRS + FLAGS], ids=["flags first", "pairs first"])
def test_a_key_value_wins_over_the_flag_for_the_same_key_in_every_stage(stage, argv):
    config = parsed(stage, argv)
    assert config.mixed_precision == "no" and config.dataset == "from-the-pair"


@pytest.mark.parametrize("stage", STAGES)
def test_a_flag_alone_sets_its_key_in_every_stage(stage):
    config = parsed(stage, FLAGS)
    assert config.mixed_precision == "bf16" and config.dataset == "from-the-flag"


def test_probe_flags_are_typed_by_the_config_and_repeated_ones_collect_a_list():
    odd = 'runs/a,b "quoted"=x.safetensors'  # a comma, quotes and '=' survive the list's encoding
    argv = ["--checkpoint", "a.safetensors", "--checkpoint", odd, "--ks", "5,10", "--seed", "3"]
    config = parsed("probe", [*argv, "--no-cache", "--data-root", "/data", "seed=4", "--method", "knn"])
    assert config.checkpoints == ["a.safetensors", odd] and config.ks == [5, 10] and config.seed == 4
    assert config.no_cache is True and config.data.root == "/data" and config.methods == ["knn"]
    assert parsed("probe", ["--checkpoint", "a.safetensors", "checkpoints=b.safetensors"]).checkpoints == [
        "b.safetensors"
    ]


def test_probe_refuses_a_model_without_random_init_and_a_flag_of_the_wrong_type():
    with pytest.raises(UsageError, match="--random-init"):
        probe_cli.parse_args(["--model", "vit_small_patch16_224"])
    with pytest.raises(UsageError, match="config key 'ks' expects an integer"):
        parsed("probe", ["--ks", "5,ten"])
