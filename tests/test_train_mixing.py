"""Caption mixing: the share of ORIGINAL captions matches p; fallbacks are counted; CFG dropout."""

from __future__ import annotations

import pytest
import torch

from t2i_recap.mixing import EMPTY, ORIGINAL, RECAPTION, MixingConfig, choose, select


@pytest.mark.parametrize("p", [0.0, 0.2, 0.5, 1.0])
def test_original_share_matches_p(p):
    n = 40_000
    has = torch.ones(n, dtype=torch.bool)
    choice, counts = choose(has, has, MixingConfig(p=p, cfg_dropout=0.1), torch.Generator().manual_seed(1))
    kept = choice != EMPTY
    share = float((choice[kept] == ORIGINAL).float().mean())
    sigma = (p * (1 - p) / int(kept.sum())) ** 0.5
    assert abs(share - p) <= 5 * sigma + 1e-9, (share, p)
    assert abs(counts.empty / n - 0.1) < 0.01
    assert counts.original + counts.recaption + counts.empty == n
    assert counts.fallback_to_original == counts.fallback_to_recaption == 0


def test_missing_captions_fall_back_and_are_counted():
    n = 10_000
    has_org = torch.ones(n, dtype=torch.bool)
    has_re = torch.arange(n) % 2 == 0  # half the recaptions are missing
    choice, counts = choose(has_org, has_re, MixingConfig(p=0.0, cfg_dropout=0.0), torch.Generator().manual_seed(0))
    assert bool((choice[~has_re] == ORIGINAL).all()) and bool((choice[has_re] == RECAPTION).all())
    assert counts.fallback_to_original == n // 2 and counts.fallback_to_recaption == 0
    choice, counts = choose(has_re, has_org, MixingConfig(p=1.0, cfg_dropout=0.0), torch.Generator().manual_seed(0))
    assert counts.fallback_to_recaption == n // 2 and bool((choice[~has_re] == RECAPTION).all())


def test_draws_do_not_depend_on_which_captions_are_missing():
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    full = torch.ones(64, dtype=torch.bool)
    part = torch.arange(64) % 3 != 0
    a, _ = choose(full, full, MixingConfig(p=0.5), g())
    b, _ = choose(full, part, MixingConfig(p=0.5), g())
    same = part | (a != RECAPTION)
    assert torch.equal(a[same], b[same])  # only the fallbacks differ


def test_a_sample_without_any_caption_is_an_error():
    with pytest.raises(ValueError, match="neither"):
        choose(torch.tensor([False]), torch.tensor([False]), MixingConfig(), torch.Generator())


def test_select_takes_rows_from_the_chosen_caption():
    org = (torch.full((3, 4, 2), 1.0), torch.ones(3, 4))
    rec = (torch.full((3, 4, 2), 2.0), torch.ones(3, 4))
    empty = (torch.full((1, 4, 2), 9.0), torch.tensor([[1, 1, 0, 0]]))
    emb, mask = select(torch.tensor([ORIGINAL, RECAPTION, EMPTY]), org, rec, empty)
    assert emb[:, 0, 0].tolist() == [1.0, 2.0, 9.0]
    assert mask[2].tolist() == [1, 1, 0, 0]


@pytest.mark.parametrize("bad", [{"p": -0.1}, {"p": 1.5}, {"cfg_dropout": 1.0}])
def test_bad_values_are_rejected(bad):
    with pytest.raises(ValueError):
        MixingConfig(**bad)
