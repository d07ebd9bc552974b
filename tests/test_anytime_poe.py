"""Product Anytime (Jazbec et al. 2023) against numbers of its authors' code
(tests/data/anytime_poe_reference.json, whose recipe names the repository, commit and inputs)."""
import json
from pathlib import Path

import pytest
import torch

from multiexit.evaluate.anytime_poe import poe_probs, poe_report

REFERENCE = json.loads((Path(__file__).parent / 'data' / 'anytime_poe_reference.json').read_text())


def reference_inputs():
    torch.manual_seed(0)  # the recipe's inputs, drawn in its order
    return torch.randn(4, 300, 10), torch.randint(0, 10, (300,))


def test_matches_the_authors_product_anytime():
    logits, labels = reference_inputs()
    probs = poe_probs(logits)
    assert probs.argmax(dim=-1).tolist() == REFERENCE['pred']
    expected = torch.tensor(REFERENCE['probs_first10'], dtype=torch.float64)
    assert torch.allclose(probs[:, :10], expected, rtol=0, atol=1e-9)  # stored to 10 decimals
    report = poe_report(logits, labels)
    assert [report[f'acc1_poe{k}'] for k in range(4)] == pytest.approx(REFERENCE['acc1'])
    # the reference collapses often (random logits): the fall-back to softmax is exercised
    assert len(REFERENCE['collapsed']) > 100


def test_a_class_once_zeroed_stays_out_and_unlabelled_examples_are_left_out():
    logits = torch.tensor([[[2.0, 1.0, -1.0]], [[0.5, -1.0, 3.0]], [[-1.0, 4.0, 5.0]]])
    probs = poe_probs(logits)
    assert probs[0, 0, 2] == 0 and (probs[1, 0, 1:] == 0).all()  # only class 0 survives exit 1
    # exit 2 zeroes class 0 too: the softmax of its own logits
    assert probs[2, 0].tolist() == pytest.approx(torch.softmax(logits[2, 0].double(), 0).tolist())
    report = poe_report(logits.expand(3, 2, 3), torch.tensor([0, -100]))
    assert report == {'acc1_poe0': 1.0, 'acc1_poe1': 1.0, 'acc1_poe2': 0.0}
