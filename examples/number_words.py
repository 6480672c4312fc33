"""The synthetic translation task of the seq2seq example: a number written in English words -> its digits.

"forty two thousand seven hundred five" -> "42705". Sentences are generated on the fly; a fixed, seeded set of numbers
is held out for testing and never drawn for training."""
import random

import torch

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SOURCE_VOCAB = [PAD] + ONES + TENS[2:] + ["hundred", "thousand"]
TARGET_VOCAB = [PAD, BOS, EOS] + [str(d) for d in range(10)]
SOURCE_INDEX = {w: i for i, w in enumerate(SOURCE_VOCAB)}
TARGET_INDEX = {w: i for i, w in enumerate(TARGET_VOCAB)}


def _below_thousand(n):
    words = []
    if n >= 100:
        words += [ONES[n // 100], "hundred"]
        n %= 100
    if n >= 20:
        words.append(TENS[n // 10])
        n %= 10
        if n:
            words.append(ONES[n])
    elif n or not words:
        words.append(ONES[n])
    return words


def to_words(n):
    """English words of 0 <= n < 1,000,000 (no "and", no hyphens)."""
    if not 0 <= n < 1_000_000:
        raise ValueError(f"to_words: n must be in [0, 1000000), got {n}")
    if n < 1000:
        return _below_thousand(n)
    words = _below_thousand(n // 1000) + ["thousand"]
    return words + (_below_thousand(n % 1000) if n % 1000 else [])


class NumberTask:
    """Numbers in [0, limit) as (words, digits) pairs; `test_size` of them, chosen by `seed`, are held out."""

    def __init__(self, limit=100_000, test_size=1000, seed=0):
        self.limit = limit
        rng = random.Random(seed)
        self.test_numbers = rng.sample(range(limit), test_size)
        self._held_out = set(self.test_numbers)
        self._rng = random.Random(seed + 1)

    def sample_train(self, batch):
        numbers = []
        while len(numbers) < batch:
            n = self._rng.randrange(self.limit)
            if n not in self._held_out:
                numbers.append(n)
        return numbers

    @staticmethod
    def encode(numbers):
        """-> source [B, S] (padded), source lengths [B], target [B, T] (digits then EOS, padded)."""
        sources = [[SOURCE_INDEX[w] for w in to_words(n)] for n in numbers]
        targets = [[TARGET_INDEX[d] for d in str(n)] + [TARGET_INDEX[EOS]] for n in numbers]
        return _pad(sources), torch.tensor([len(s) for s in sources]), _pad(targets)


def _pad(rows):
    out = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r)
    return out


def decode_digits(ids):
    """Target ids -> the digit string up to (not including) the first EOS."""
    out = []
    for i in ids:
        token = TARGET_VOCAB[int(i)]
        if token == EOS:
            break
        out.append(token)
    return "".join(out)
