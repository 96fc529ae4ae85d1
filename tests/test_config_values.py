"""SFDConfig refuses values that would train silently into a NaN model or crash later (issue 19):
every int field an integer, every float field finite, each error naming the field and the value."""

from __future__ import annotations

import json

import pytest

from sfd_fast import SFDConfig
from sfd_fast.core.config import parse_overrides

BAD = [
    ("lr_gen=Infinity", "lr_gen must be a finite number, got inf"),
    ("p_mean=NaN", "p_mean must be a finite number, got nan"),
    ("alpha=NaN", "alpha must be a finite number, got nan"),
    ("sigma_max=Infinity", "sigma_max must be a finite number, got inf"),
    ("sigma_init=Infinity", "sigma_init must be a finite number, got inf"),
    ("gen_loss_scale=Infinity", "gen_loss_scale must be a finite number, got inf"),
    ("ema_rampup_ratio=NaN", "ema_rampup_ratio must be a finite number or null, got nan"),
    ("ema_rampup_ratio=-1", "ema_rampup_ratio must be > 0 or None, got -1.0"),
    ("batch_size=1.5", "batch_size must be an integer, got 1.5"),
    ('batch_size="abc"', "batch_size must be an integer, got 'abc' \\(str\\)"),
    ("batch_size=null", "batch_size must be an integer, got None"),
    ("batch_size=true", "batch_size must be an integer, got True"),
    ("adam_betas=[0.1]", r"adam_betas must be two numbers \[beta1, beta2\], got \[0.1\]"),
    ("adam_eps=0", "adam_eps must be > 0, got 0.0"),
]


@pytest.mark.parametrize("item, message", BAD, ids=[b[0] for b in BAD])
def test_bad_value_is_refused_with_its_name(item, message):
    with pytest.raises(ValueError, match=message):
        SFDConfig(**parse_overrides([item]))


def test_whole_numbers_and_ints_are_accepted_and_normalised():
    cfg = SFDConfig(**parse_overrides(["batch_size=4.0", "lr_gen=1", "grad_clip_value=null"]))
    assert (cfg.batch_size, cfg.lr_gen, cfg.grad_clip_value) == (4, 1.0, None)
    assert type(cfg.batch_size) is int and type(cfg.lr_gen) is float
    assert SFDConfig.from_dict(json.loads(cfg.to_json())) == cfg
