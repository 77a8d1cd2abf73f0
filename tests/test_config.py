"""Config loading: YAML + dotted overrides, unknown keys with suggestions, bad values, exit code 2 from the CLI."""
import subprocess
import sys
from pathlib import Path

import pytest

from goca_fast.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_every_shipped_config_loads():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.name


def test_official_recipe_values():
    cfg = load_config(ROOT / "configs" / "ucf101_s3d_official.yaml")
    assert cfg.clip_lengths == [32, 32, 16, 16, 16, 16] and cfg.data.stride == 2
    assert (cfg.model.arch, cfg.data.crop_size, cfg.model.num_prototypes) == ("s3d", 128, 1000)
    assert (cfg.goca.epsilon, cfg.goca.prior_epsilon, cfg.goca.prior_sign) == (0.02, 0.03, "official")
    assert cfg.optim.larc and cfg.optim.base_lr == 0.15 and cfg.optim.lr_scaling == "sqrt" and cfg.optim.epochs == 500


def test_overrides_are_typed_and_nested():
    cfg = load_config(ROOT / "configs" / "demo.yaml",
                      ["data.batch_size=4", "goca.epsilon=0.02", "data.frames_per_group=[4,2]", "goca.cycles=2"])
    assert cfg.data.batch_size == 4 and cfg.goca.epsilon == 0.02 and cfg.data.frames_per_group == [4, 2]
    assert cfg.goca.cycles == 2


@pytest.mark.parametrize("override,needle", [
    ("data.batchsize=4", "unknown config key 'data.batchsize' (did you mean 'data.batch_size'?)"),
    ("goca.prior_sgn=kl", "did you mean 'goca.prior_sign'"),
    ("goca.prior_sign=plus", "goca.prior_sign: 'plus' is not one of 'kl', 'official'"),
    ("data.batch_size=four", "data.batch_size: expected an integer"),
    ("goca.epsilon=-1", "goca.epsilon must be > 0"),
    ("data.hflip_p=1.5", "data.hflip_p must be a probability in [0, 1]"),
    ("goca.prior_to=flow", "goca.prior_to: 'flow' is not one of 'both', 'rgb'"),
    ("goca.assign_clips=[0,9]", "goca.assign_clips"),
    ("data.crop_size=500", "data.crop_size"),
    ("nonsense", "not of the form key.sub=value"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs" / "demo.yaml", [override])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_rgb_only_prior_refuses_two_cycles():
    with pytest.raises(ConfigError, match="goca.prior_to=rgb has one guided pass"):
        load_config(ROOT / "configs" / "demo.yaml", ["goca.prior_to=rgb", "goca.cycles=2"])
    assert load_config(ROOT / "configs" / "demo.yaml", ["goca.prior_to=rgb"]).goca.prior_to == "rgb"


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.epoch' \(did you mean 'optim.epochs'\?\)"):
        load_config(p)
    p.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_cli_reports_one_line_and_exit_code_2():
    r = subprocess.run([sys.executable, "-m", "goca_fast.cli.pretrain", "data.batchsize=4"], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2
    lines = [l for l in r.stderr.strip().splitlines() if l]
    assert len(lines) == 1 and "data.batchsize" in lines[0] and "batch_size" in lines[0]
