"""The examples run end to end for a few steps and write what they promise (plots, metrics)."""
import json
import os
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")


def test_number_words():
    from number_words import NumberTask, decode_digits, to_words
    assert " ".join(to_words(0)) == "zero"
    assert " ".join(to_words(40705)) == "forty thousand seven hundred five"
    assert " ".join(to_words(999999)) == "nine hundred ninety nine thousand nine hundred ninety nine"
    with pytest.raises(ValueError, match="n must be"):
        to_words(1_000_000)
    task = NumberTask(limit=1000, test_size=100)
    assert not set(task.sample_train(500)) & set(task.test_numbers)
    src, lengths, tgt = task.encode([7, 120])
    assert lengths.tolist() == [1, 3] and src.shape == (2, 3)
    assert decode_digits(tgt[1]) == "120"


def test_seq2seq_translate_runs(tmp_path):
    import torch
    import seq2seq_translate
    threads = torch.get_num_threads()
    try:  # one thread: tiny steps on a shared machine otherwise spend most of their time waiting for OpenMP peers
        metrics = seq2seq_translate.main(["--steps", "3", "--batch", "16", "--test-size", "16", "--throughput-rounds",
                                          "1", "--threads", "1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "attention.png").stat().st_size > 0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["steps"] == 3 and 0.0 <= saved["greedy_exact_match"] <= 1.0 and 0.0 <= saved["beam_exact_match"] <= 1.0
    assert set(saved["train_sentences_per_s"]) == {"seqfast", "torch"}
    assert metrics["impl"] == "seqfast"


def test_seq2seq_models_agree():
    """--impl torch and --impl seqfast build the same model: same state_dict keys, same outputs for the same weights."""
    import torch
    import seq2seq_translate
    from number_words import NumberTask
    torch.manual_seed(0)
    ours, ref = seq2seq_translate.Translator("seqfast"), seq2seq_translate.Translator("torch")
    ref.load_state_dict(ours.state_dict())
    src, lengths, tgt = NumberTask(limit=1000, test_size=10).encode([5, 101, 999])
    torch.testing.assert_close(ours(src, lengths, tgt), ref(src, lengths, tgt), rtol=1e-4, atol=1e-5)
    beams = seq2seq_translate.beam_search(ours, src, lengths, beam=3)
    assert beams.shape[0] == 3


def test_gradient_flow_runs(tmp_path):
    import gradient_flow
    norms = gradient_flow.main(["--steps", "20", "--seeds", "1", "--batch", "2", "--hidden", "8",
                                "--out", str(tmp_path)])
    assert (tmp_path / "gradient_flow.png").stat().st_size > 0
    assert all(len(g) == 20 for g in norms.values())
