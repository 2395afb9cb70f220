import numpy as np
import torch

from raysegbg.metrics import confusion, summarize


def test_confusion_ignores_ignore_index():
    target = torch.tensor([[0, 1, 255], [2, 2, 1]])
    pred = torch.tensor([[0, 2, 1], [2, 1, 1]])
    cm = confusion(pred, target, 3, 255).numpy()
    assert cm.sum() == 5
    assert cm[0, 0] == 1 and cm[1, 2] == 1 and cm[2, 2] == 1 and cm[2, 1] == 1 and cm[1, 1] == 1


def test_summary_matches_hand_computation():
    # rows = truth (bg, fg), columns = prediction
    cm = np.array([[90, 10], [5, 45]])
    m = summarize(cm, ["bg", "fg"])
    assert np.isclose(m["iou/bg"], 90 / (90 + 10 + 5))
    assert np.isclose(m["iou/fg"], 45 / (45 + 10 + 5))
    assert np.isclose(m["miou"], (m["iou/bg"] + m["iou/fg"]) / 2)
    assert np.isclose(m["fg_dice"], 2 * 45 / (2 * 45 + 10 + 5))
    assert np.isclose(m["precision"], 45 / 55) and np.isclose(m["recall"], 45 / 50)
    assert np.isclose(m["fpr"], 10 / 100)  # background called foreground: over-segmentation


def test_multiclass_foreground_is_any_non_background():
    cm = np.array([[8, 1, 1], [0, 3, 2], [1, 0, 4]])
    m = summarize(cm)
    assert np.isclose(m["fpr"], 2 / 10)
    assert np.isclose(m["recall"], 9 / 10)  # fg pixels predicted as some fg class
    assert np.isnan(summarize(np.array([[5, 0], [0, 0]]))["iou/1"])  # absent class -> NaN
