"""The SiT generator's pieces without a fixture: registry entries and their tokenizers, the CFG interval counts the
official README setting gives, and one-line refusals of bad sampling input."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def gen():
    from tokcli.gen.sit.model import SiT

    return SiT(input_size=4, in_channels=2, hidden_size=16, depth=1, num_heads=2, num_classes=3)


def test_registry_entries_name_registered_tokenizers():
    from tokcli.core.registry import entries, get_family
    from tokcli.gen.sit.registry import TOKENIZERS

    reg = entries()
    sit = sorted(n for n, e in reg.items() if e.family == "sit")
    assert len(sit) == 9 and set(sit) == set(TOKENIZERS)  # the eight releases and the shipped demo
    assert all(TOKENIZERS[n] in reg and reg[TOKENIZERS[n]].family == "softvq" for n in sit)
    assert get_family("sit").kind == "generator"
    e = reg["sit-xl_softvq-b-64"]
    assert e.hub_repo == "SoftVQVAE/sit-xl_softvq-b-64" and e.paper_metrics["gFID (cfg)"] == 1.78
    assert e.model_args["input_size"] == 64 and e.model_args["in_channels"] == 32


def test_tokenizer_ref_of_a_release(tmp_path, monkeypatch):
    from tokcli.gen.sit.convert import tokenizer_ref

    monkeypatch.setenv("TOK_CACHE", str(tmp_path))
    assert tokenizer_ref("sit-xl_softvq-l-32") == {"name": "softvq-l-32", "sha256": None}
    assert tokenizer_ref("my-own-folder") == {}


def test_guidance_interval_counts_of_the_readme_setting():
    from tokcli.gen.sit.sampler import is_guided, time_grid

    for sampler, want in (("ode", 175), ("sde", 172)):
        grid = time_grid(sampler, 250).tolist()
        assert len(grid) == 251 and grid[0] == 1.0 and grid[-1] == 0.0
        assert sum(is_guided(t, 1.75, (0.0, 0.7)) for t in grid[:-1]) == want
    assert not any(is_guided(t, 1.0, (0.0, 1.0)) for t in time_grid("ode", 10).tolist())


def test_pos_table_is_interleaved_sin_cos():
    import math

    from tokcli.gen.sit.model import sincos_table_1d

    t = sincos_table_1d(8, 3)
    assert t.shape == (3, 8)
    assert abs(float(t[2, 2]) - math.sin(2 * 10000 ** (-2 / 8))) < 1e-6
    assert abs(float(t[2, 3]) - math.cos(2 * 10000 ** (-2 / 8))) < 1e-6


@pytest.mark.parametrize("kwargs, needle", [
    ({"steps": 0}, "steps must be a positive integer"),
    ({"steps": 2.5}, "steps must be a positive integer"),
    ({"sampler": "heun"}, "sampler must be one of"),
    ({"path_type": "edm"}, "path_type must be one of"),
    ({"cfg": float("nan")}, "cfg must be a number"),
    ({"guidance_interval": [0.5]}, "guidance_interval must be two numbers"),
    ({"temperature": 1.0}, "takes no sampler option temperature"),
])
def test_bad_sampler_options(gen, kwargs, needle):
    from tokcli.errors import TokUsageError

    with pytest.raises(TokUsageError, match=needle.replace("(", r"\(")):
        gen.sample([0], **{"steps": 2, **kwargs})


def test_bad_labels_seeds_and_noise(gen):
    import torch

    from tokcli.errors import TokUsageError

    for labels, needle in (([3], "class 3 is out of range"), ([-1], "out of range"), ([], "no labels"),
                           ([0.5], "labels must be a list of class ids")):
        with pytest.raises(TokUsageError, match=needle):
            gen.sample(labels, steps=1)
    with pytest.raises(TokUsageError, match="2 seeds for 1 samples"):
        gen.sample([0], seed=[1, 2], steps=1)
    with pytest.raises(TokUsageError, match=r"noise z must be \[1, 4, 2\]"):
        gen.sample([0], noise=torch.zeros(1, 4, 3), steps=1)
    with pytest.raises(TokUsageError, match="noise steps must be"):
        gen.sample([0], noise={"z": torch.zeros(1, 4, 2), "steps": torch.zeros(1, 1, 4, 2)}, steps=3)


def test_no_null_class_means_no_cfg():
    from tokcli.errors import TokUsageError
    from tokcli.gen.sit.model import SiT

    g = SiT(input_size=2, in_channels=2, hidden_size=8, depth=1, num_heads=2, num_classes=2, class_dropout_prob=0)
    assert g.null_class is None and g.y_embedder.embedding_table.num_embeddings == 2
    with pytest.raises(TokUsageError, match="no null class"):
        g.sample([0], steps=1, cfg=2.0)
    assert g.sample([1], steps=1, cfg=1.0).shape == (1, 2, 2)
