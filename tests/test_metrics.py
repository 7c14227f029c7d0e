"""diffclip.metrics on constructed score matrices with known answers."""

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score

from diffclip.metrics import classification_metrics, rank_of, retrieval_metrics


def test_classification_known_answers_fewer_than_5_classes():
    logits = torch.tensor([[3.0, 1.0, 0.0],   # pred 0, target 0: right
                           [0.0, 2.0, 1.0],   # pred 1, target 1: right
                           [5.0, 0.0, 4.0],   # pred 0, target 2: wrong
                           [0.0, 0.0, 9.0]])  # pred 2, target 2: right
    m = classification_metrics(logits, torch.tensor([0, 1, 2, 2]))
    assert set(m) == {"acc1", "mean_per_class_recall"}  # no acc5 with 3 classes
    assert m["acc1"] == pytest.approx(0.75)
    assert m["mean_per_class_recall"] == pytest.approx((1 + 1 + 0.5) / 3)


def test_classification_ties_lower_index_wins():
    logits = torch.zeros(3, 6)  # every class tied: the rank of class c is c
    m = classification_metrics(logits, torch.tensor([0, 4, 5]))
    assert m["acc1"] == pytest.approx(1 / 3)  # only target 0 is first
    assert m["acc5"] == pytest.approx(2 / 3)  # 0 and 4 are in the top 5, 5 is not
    # a tie with the target at the top: the lower index comes first
    assert rank_of(torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([1])).item() == 1
    assert rank_of(torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([0])).item() == 0


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_classification_matches_sklearn_without_ties():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 12, generator=g)
    targets = torch.randint(0, 12, (200,), generator=g)
    targets[targets == 7] = 3  # class 7 absent: left out of the mean per-class recall
    m = classification_metrics(logits, targets)
    labels = np.arange(12)
    assert m["acc1"] == pytest.approx(top_k_accuracy_score(targets, logits, k=1, labels=labels))
    assert m["acc5"] == pytest.approx(top_k_accuracy_score(targets, logits, k=5, labels=labels))
    assert m["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(targets, logits.argmax(1)))


def test_classification_bad_input():
    with pytest.raises(ValueError, match="targets must lie"):
        classification_metrics(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="at least one"):
        classification_metrics(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="expected logits"):
        classification_metrics(torch.zeros(2, 3), torch.tensor([0, 1, 2]))


def _reference_retrieval(scores_t2i: np.ndarray, text_to_image: np.ndarray, k: int) -> tuple[float, float]:
    """Loop version: stable descending sort (ties: lower index first)."""
    n_txt, n_img = scores_t2i.shape
    img_hits = [text_to_image[t] in np.argsort(-scores_t2i[t], kind="stable")[:k] for t in range(n_txt)]
    txt_hits = []
    for i in range(n_img):
        top = np.argsort(-scores_t2i[:, i], kind="stable")[:k]
        txt_hits.append(any(text_to_image[t] == i for t in top))
    return float(np.mean(img_hits)), float(np.mean(txt_hits))


def test_retrieval_several_captions_known_answer():
    # 3 images on the axes; captions 0,1 -> image 0, caption 2 -> image 1, captions 3,4 -> image 2
    img = torch.eye(3)
    txt = torch.tensor([[1.0, 0, 0],     # matches image 0
                        [0, 1.0, 0],     # caption of image 0 that points at image 1
                        [0, 1.0, 0],     # matches image 1
                        [0, 0, 1.0],     # matches image 2
                        [1.0, 0, 0]])    # caption of image 2 that points at image 0
    t2i = torch.tensor([0, 0, 1, 2, 2])
    m = retrieval_metrics(img, txt, t2i, ks=(1, 2))
    assert m["image_retrieval_recall@1"] == pytest.approx(3 / 5)  # captions 0, 2, 3 find their image first
    # image 0: captions 0 and 4 score 1, caption 0 comes first -> hit; image 1: captions 1 and 2 score 1, caption 1
    # (of image 0) comes first -> miss at 1, hit at 2; image 2: caption 3 -> hit
    assert m["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert m["text_retrieval_recall@2"] == pytest.approx(1.0)
    assert list(m) == ["image_retrieval_recall@1", "image_retrieval_recall@2", "text_retrieval_recall@1",
                       "text_retrieval_recall@2"]


def test_retrieval_all_tied():
    img, txt = torch.zeros(4, 2), torch.zeros(8, 2)
    t2i = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    m = retrieval_metrics(img, txt, t2i, ks=(1, 3))
    # text->image: every image tied, rank = image index
    assert m["image_retrieval_recall@1"] == pytest.approx(2 / 8)
    assert m["image_retrieval_recall@3"] == pytest.approx(6 / 8)
    # image->text: the best caption of image i is caption 2i, at rank 2i
    assert m["text_retrieval_recall@1"] == pytest.approx(1 / 4)
    assert m["text_retrieval_recall@3"] == pytest.approx(2 / 4)


def test_retrieval_matches_loop_reference_with_ties_and_chunks():
    g = torch.Generator().manual_seed(1)
    img = torch.randint(0, 3, (7, 4), generator=g).float()  # small integers: many tied scores
    txt = torch.randint(0, 3, (17, 4), generator=g).float()
    t2i = torch.cat([torch.arange(7), torch.randint(0, 7, (10,), generator=g)])
    for k in (1, 2, 5):
        m = retrieval_metrics(img, txt, t2i, ks=(k,), chunk_size=3)
        ref_img, ref_txt = _reference_retrieval((txt @ img.T).numpy(), t2i.numpy(), k)
        assert m[f"image_retrieval_recall@{k}"] == pytest.approx(ref_img)
        assert m[f"text_retrieval_recall@{k}"] == pytest.approx(ref_txt)


def test_retrieval_bad_input():
    with pytest.raises(ValueError, match="no caption"):
        retrieval_metrics(torch.eye(3), torch.eye(3)[:2], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="must lie"):
        retrieval_metrics(torch.eye(3), torch.eye(3), torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="embeddings"):
        retrieval_metrics(torch.eye(3), torch.zeros(3, 2), torch.tensor([0, 1, 2]))
