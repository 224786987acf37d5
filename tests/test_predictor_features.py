"""predictor/features.py and buckets.py: deterministic features, matching layouts, bucket edges."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from predictor.buckets import BucketSpec
from predictor.features import DENSE_NAMES, FeatureSpec, RequestInfo, extract, to_csr, to_dense

SPEC = FeatureSpec(hash_dim=512)
INFO = RequestInfo(
    "Write an essay about rivers?\n- one\n- two\n```py\ndef f(): return 1\n```", 42, 3, 256, "m"
)


def test_features_are_deterministic_within_and_across_processes():
    row = extract(INFO, SPEC)
    assert row == extract(INFO, SPEC)
    code = (
        "from predictor.features import *; "
        f"print(extract(RequestInfo({INFO.text!r}, 42, 3, 256, 'm'), FeatureSpec(hash_dim=512)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(row)  # crc32, not Python's salted hash()


def test_dense_features_see_the_request():
    dense = dict(zip(DENSE_NAMES, extract(INFO, SPEC).dense, strict=True))
    assert dense["log_prompt_tokens"] == pytest.approx(np.log1p(42))
    assert dense["num_question_marks"] == 1
    assert dense["num_list_items"] == 2
    assert dense["has_code_fence"] == 1
    assert dense["num_messages"] == 3
    assert dense["log_max_tokens"] == pytest.approx(np.log1p(256))


def test_hashed_ngrams_depend_on_words_and_stay_in_range():
    a = extract(RequestInfo("write an essay", 3), SPEC).hashed
    b = extract(RequestInfo("write a haiku", 3), SPEC).hashed
    assert a != b and all(0 <= h < SPEC.hash_dim for h in a + b)
    assert list(a) == sorted(set(a))
    # Only the first max_words and last tail_words words are hashed: a word in the middle changes nothing.
    words = [f"w{i}" for i in range(2000)]
    middle = words[:1000] + ["essay"] + words[1000:]
    assert (
        extract(RequestInfo(" ".join(words), 2000), SPEC).hashed
        == extract(RequestInfo(" ".join(middle), 2000), SPEC).hashed
    )


def test_dense_and_csr_layouts_agree():
    rows = [extract(INFO, SPEC), extract(RequestInfo("hi", 1), SPEC)]
    csr = to_csr(rows, SPEC).toarray()
    assert csr.shape == (2, SPEC.num_features)
    for i, row in enumerate(rows):
        np.testing.assert_array_equal(csr[i], to_dense(row, SPEC)[0])


def test_buckets():
    linear, pow2 = BucketSpec("linear", 64), BucketSpec("pow2", 16)
    assert [linear.bucket(n) for n in (0, 1, 64, 65, 500)] == [64, 64, 64, 128, 512]
    assert [linear.index(n) for n in (1, 64, 65)] == [0, 0, 1]
    assert [pow2.bucket(n) for n in (1, 16, 17, 100, 1024)] == [16, 16, 32, 128, 1024]
    assert BucketSpec.parse("pow2:32") == BucketSpec("pow2", 32) and BucketSpec.parse("48").width == 48
    with pytest.raises(ValueError):
        BucketSpec("log", 8)
