"""The mine.* configuration keys validate with their names."""

import pytest

from g2e import configuration
from g2e.main import STAGE_NAMES


@pytest.mark.parametrize(
    "key, value",
    [("judge_batch_size", 0), ("block_size", 0), ("top_k", 0), ("judge_threshold", 1.0)],
)
def test_bad_mine_keys_are_named(key, value):
    config = configuration.base_config()
    config.model_dir, config.data.train_dir, config.data.eval_dir = "/m", "/t", "/e"
    config.mine[key] = value
    with pytest.raises(configuration.ConfigError, match=rf"--config\.mine\.{key}"):
        configuration.validate(config, STAGE_NAMES)
