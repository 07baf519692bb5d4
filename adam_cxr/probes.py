"""Frozen-feature measures: what a pretrained backbone knows, read without training it (docs/learning.md).

Each measure takes a torchvision ResNet backbone (fc = Identity) and never updates it, so it takes seconds per
encoder and separates what pretraining learned from what fine-tuning would learn on top. Every table is read
against two baselines that need no pretraining: the same architecture at random init (what the architecture
knows by itself) and a no-look predictor (what the task gives away without looking at the image).

  pooled features   global-average-pooled layer4 -> linear probe (logistic regression) and k-NN of an image label
  landmarks         one-shot landmark localisation: the feature at a landmark of image i is matched to the most
                    similar location of image j; error in pixels. No look: the landmark at the same pixel as in i.
  mask probe        per-pixel logistic regression of a structure's mask from dense features of n images; Dice and
                    average precision on held-out images. No look: the mean training mask, thresholded.
  label probe       logistic regression of each image label from pooled features; AUC. No look: 0.5.

Dense features are layers 2, 3 and 4 (strides 8, 16, 32), each L2-normalised per location, upsampled to
stride 8 and concatenated: coarse context and finer position, as in hypercolumns.
"""
import numpy as np
import torch
import torch.nn.functional as F

from adam import imagenet_normalise as _normalise  # the one normalisation: as pretraining fed the encoder


def _batches(images, size, batch_size, device):
    """images: N x H x W (or N x 1 x H x W) uint8 -> float batches B x 1 x size x size in [0, 1]."""
    for s in range(0, len(images), batch_size):
        x = torch.as_tensor(np.array(images[s:s + batch_size]), dtype=torch.float32).div_(255)
        x = x[:, None] if x.ndim == 3 else x
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        yield x.to(device)


@torch.no_grad()
def pooled_features(backbone, images, size, device="cpu", batch_size=128):
    """N x D float32 global-average-pooled layer4 features (the backbone's own forward with fc = Identity)."""
    backbone.eval()
    return torch.cat([backbone(_normalise(x)).float().cpu() for x in _batches(images, size, batch_size, device)]).numpy()


@torch.no_grad()
def dense_features(backbone, images, size, device="cpu", batch_size=32, layers=(2, 3, 4)):
    """N x C x size/8 x size/8 float32: layers 2-4, each L2-normalised per location, upsampled to stride 8."""
    backbone.eval()
    out = []
    for x in _batches(images, size, batch_size, device):
        b = backbone
        h = b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(_normalise(x))))))
        maps = []
        for n in (2, 3, 4):
            h = getattr(b, f"layer{n}")(h)
            if n in layers:
                maps.append(F.interpolate(F.normalize(h.float(), dim=1), size=(size // 8, size // 8),
                                          mode="bilinear", align_corners=False))
        out.append(torch.cat(maps, 1).cpu())
    return torch.cat(out).numpy()


def _standardise(train, *others):
    mu, sd = train.mean(0), train.std(0) + 1e-6
    return [(a - mu) / sd for a in (train, *others)]


def linear_probe(train_f, train_y, test_f, test_y, C=1.0):
    """Accuracy of a multinomial logistic regression on standardised frozen features."""
    from sklearn.linear_model import LogisticRegression
    tr, te = _standardise(train_f, test_f)
    clf = LogisticRegression(C=C, max_iter=2000).fit(tr, train_y)
    return float((clf.predict(te) == test_y).mean())


def knn(train_f, train_y, test_f, test_y, k=5):
    """Accuracy of a k-NN vote (cosine similarity of L2-normalised features, ties to the smallest label)."""
    a = train_f / np.maximum(np.linalg.norm(train_f, axis=1, keepdims=True), 1e-12)
    b = test_f / np.maximum(np.linalg.norm(test_f, axis=1, keepdims=True), 1e-12)
    nn_idx = np.argsort(-(b @ a.T), axis=1, kind="stable")[:, :k]              # N_test x k
    votes = np.apply_along_axis(np.bincount, 1, train_y[nn_idx], minlength=int(train_y.max()) + 1)
    return float((votes.argmax(1) == test_y).mean())


def _upsample(a, size):
    """N x h x w float32 numpy -> N x size x size (bilinear, as the features were upsampled)."""
    return F.interpolate(torch.from_numpy(a)[:, None], size=size, mode="bilinear", align_corners=False)[:, 0].numpy()


def landmarks(feats, lm, image_size, pairs):
    """One-shot landmark localisation. feats: N x C x h x w dense features of N images of side image_size; lm:
    N x L x 2 (x, y) pixels; pairs: (i, j) index pairs. For each landmark of image i, its feature (bilinear at the
    landmark) is matched to every location of image j by cosine; the best location (on the similarity map
    upsampled to pixels) is the prediction. Returns the errors in pixels, P x L, and the no-look errors (the
    landmark predicted at the same pixel as in image i), P x L."""
    N, C, h, w = feats.shape
    f = torch.from_numpy(feats)
    err, nolook = [], []
    for i, j in pairs:
        grid = torch.from_numpy(lm[i]).float() / image_size * 2 - 1            # L x 2 in [-1, 1] (x, y)
        q = F.grid_sample(f[i:i + 1], grid[None, :, None], mode="bilinear", align_corners=False)[0, :, :, 0]  # C x L
        sim = torch.einsum("cl,chw->lhw", F.normalize(q, dim=0), F.normalize(f[j], dim=0))  # L x h x w
        sim = _upsample(sim.numpy(), image_size)                                   # L x S x S
        flat = sim.reshape(len(q.T), -1).argmax(1)
        pred = np.stack([flat % image_size + 0.5, flat // image_size + 0.5], 1)   # L x 2 pixel centres (x, y)
        err.append(np.linalg.norm(pred - lm[j], axis=1))
        nolook.append(np.linalg.norm(lm[i] - lm[j], axis=1))
    return np.array(err), np.array(nolook)


def summarise_errors(err, within=16):
    return dict(median=float(np.median(err)), mean=float(np.mean(err)), within=float(np.mean(err <= within)))


def dice(pred, target):
    """Dice of two boolean arrays (1 when both are empty: nothing to find, nothing found)."""
    s = pred.sum() + target.sum()
    return float(2 * (pred & target).sum() / s) if s else 1.0


def mask_probe(feats_train, masks_train, feats_test, masks_test, C=0.1):
    """Per-pixel logistic regression of one structure. feats_*: n x C x h x w; masks_*: n x H x W bool.
    The target of a feature cell is the majority of its pixels; the predicted probability map is upsampled to
    H x W. Returns (Dice per test image at p >= 0.5, average precision over all test pixels)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import average_precision_score
    n, Cf, h, w = feats_train.shape
    H = masks_train.shape[-1]
    target = F.adaptive_avg_pool2d(torch.from_numpy(masks_train.astype(np.float32))[:, None], (h, w))[:, 0] >= 0.5
    X = feats_train.transpose(0, 2, 3, 1).reshape(-1, Cf)
    Xt = feats_test.transpose(0, 2, 3, 1).reshape(-1, Cf)
    y = target.numpy().ravel()
    if y.all() or not y.any():                  # one class only: the probe can only predict it everywhere
        p = np.full((len(feats_test), H, H), float(y.mean()), np.float32)
    else:
        X, Xt = _standardise(X, Xt)
        clf = LogisticRegression(C=C, max_iter=500).fit(X, y)
        p = _upsample(clf.predict_proba(Xt)[:, 1].reshape(-1, h, w).astype(np.float32), H)
    d = [dice(pi >= 0.5, mi) for pi, mi in zip(p, masks_test)]
    return d, float(average_precision_score(masks_test.ravel(), p.ravel()))


def mask_nolook(masks_train, masks_test):
    """The no-look segmenter: the mean training mask as the probability of every test image."""
    p = masks_train.mean(0)
    from sklearn.metrics import average_precision_score
    return ([dice(p >= 0.5, m) for m in masks_test],
            float(average_precision_score(masks_test.ravel(), np.broadcast_to(p, masks_test.shape).ravel())))


def label_probe(train_f, train_y, test_f, test_y, names, C=0.1):
    """AUC of one logistic regression per image label. A label whose train or test split lacks a positive or a
    negative has no AUC: its entry says why instead of holding a number (never NaN)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    tr, te = _standardise(train_f, test_f)
    out = {}
    for c, name in enumerate(names):
        a, b = train_y[:, c], test_y[:, c]
        if len(set(a)) < 2 or len(set(b)) < 2:
            split = "train" if len(set(a)) < 2 else "test"
            out[name] = f"undefined: the {split} images are all {'positive' if a.all() or b.all() else 'negative'}"
            continue
        clf = LogisticRegression(C=C, max_iter=2000).fit(tr, a)
        out[name] = float(roc_auc_score(b, clf.decision_function(te)))
    return out


# ----------------------------------------------------------------------------- the measures of a labelled cache

def measure(backbone, cache, size=None, shots=(3, 12), draws=5, test_images=100, seed=0, device="cpu"):
    """Every frozen measure the cache supports, for one backbone. size: the side the images are fed at (default: the
    cache's). Landmarks on the pairs (test image t, test image t+1); mask probes for the heart and for the two
    clavicles as one structure, `draws` random choices of `shots` train images each; label probe on the pooled
    features of the train and test splits. Returns {measure: numbers}; the same draws for every backbone."""
    size = size or cache.meta["height"]
    rng = np.random.default_rng(seed)
    test = cache.rows("test")[:test_images]
    train = cache.rows("train")
    out = {}
    need_dense = cache.landmarks is not None or cache.masks is not None
    f_test = dense_features(backbone, cache.images[test], size, device) if need_dense else None
    if cache.landmarks is not None:
        lm = cache.landmarks[test] * (size / cache.meta["height"])
        err, nolook = landmarks(f_test, lm, size, [(t, t + 1) for t in range(len(test) - 1)])
        out["landmarks"] = dict(errors=err, nolook=nolook, scale=cache.meta["height"] / size)
    if cache.masks is not None:
        structures = {"heart": ["heart"], "clavicles": ["left_clavicle", "right_clavicle"]}
        names = cache.meta["structures"]
        draw_rows = {n: [rng.choice(len(train), n, replace=False) for _ in range(draws)] for n in shots}
        used = sorted({int(i) for rows in draw_rows.values() for r in rows for i in r})
        f_train = dict(zip(used, dense_features(backbone, cache.images[[train[i] for i in used]], size, device)))
        out["masks"] = {}
        for s, parts in structures.items():
            if not all(p in names for p in parts):
                continue
            mask = lambda rows: np.any(cache.masks[rows][:, [names.index(p) for p in parts]] > 0, axis=1)
            m_test = mask(test)
            for n in shots:
                res = []
                for r in draw_rows[n]:
                    rows = [train[i] for i in r]
                    d, ap = mask_probe(np.stack([f_train[int(i)] for i in r]), mask(rows), f_test, m_test)
                    d0, ap0 = mask_nolook(mask(rows), m_test)
                    res.append(dict(dice=float(np.mean(d)), ap=ap, nolook_dice=float(np.mean(d0)), nolook_ap=ap0))
                out["masks"][f"{s}@{n}"] = res
    if cache.meta.get("label_names"):
        lab = [train[i] for i in rng.permutation(len(train))[:400]]
        y = cache.label_matrix()
        f_tr, f_te = (pooled_features(backbone, cache.images[r], size, device) for r in (lab, cache.rows("test")))
        out["labels"] = label_probe(f_tr, y[lab], f_te, y[cache.rows("test")], cache.meta["label_names"])
    return out


def headline(result, within=16):
    """The numbers of a measure() result that tables print: landmark error (pixels of the cache's images) and
    the no-look error; per mask task Dice and AP (means over draws) and the no-look Dice; label AUCs."""
    row = {}
    if "landmarks" in result:
        lm = result["landmarks"]
        for key, e in (("landmark", lm["errors"]), ("landmark_nolook", lm["nolook"])):
            s = summarise_errors(np.asarray(e) * lm["scale"], within)
            row.update({f"{key}_median_px": s["median"], f"{key}_mean_px": s["mean"], f"{key}_within{within}": s["within"]})
    for task, draws in result.get("masks", {}).items():
        for k in ("dice", "ap", "nolook_dice", "nolook_ap"):
            row[f"{task}_{k}"] = float(np.mean([d[k] for d in draws]))
    for name, auc in result.get("labels", {}).items():
        row[f"auc_{name}"] = auc
    return row


def nolook_key(key):
    """The headline key of the no-look baseline of `key` (None when the measure has none in the row)."""
    if key.startswith("landmark_"):
        return "landmark_nolook_" + key[len("landmark_"):]
    for end in ("_dice", "_ap"):
        if key.endswith(end):
            return key[:-len(end)] + "_nolook" + end
    return None


def nolook(row, key):
    """The no-look baseline's value of headline key `key` in `row`: 0.5 for an AUC (a score that ignores the image
    ranks at chance), the row's own no-look number for the others that have one, else None."""
    if key.startswith("auc_"):
        return 0.5
    return row.get(nolook_key(key))


def lower_is_better(key):
    """Whether a smaller value of a headline key is the better one: the pixel errors; for the shares within a
    distance, Dice, AP and AUC higher is better."""
    return key.endswith("_px")
