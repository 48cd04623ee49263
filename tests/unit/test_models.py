"""shared.models: registry, networks, decoders, losses, model directories and the Predictor."""

import json
import math

import numpy as np
import pytest
import torch

from shared.models import (
    ARCHS,
    DEFAULT_CLASSES,
    ModelError,
    ModelMeta,
    Predictor,
    SimpleYOLO,
    build,
    decode_yolo,
    default_meta,
    describe,
    dice_bce_loss,
    find_hotspots,
    load_model_dir,
    radiometric_stats,
    register,
    save_model_dir,
    yolo_loss,
)

ALL_ARCHS = {"simple_cnn", "compact_cnn", "small_resnet", "resnet18", "resnet50", "efficientnet_b0", "simple_yolo",
             "anchor_free", "unet", "unet_small", "thermal_cnn"}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---- registry ---------------------------------------------------------------------------------

def test_describe_lists_every_architecture_with_shapes():
    rows = {r["arch"]: r for r in describe()}
    assert set(rows) == ALL_ARCHS
    assert all(type(r["params"]) is int and r["params"] > 0 for r in rows.values())
    assert rows["simple_cnn"]["input"] == [3, 224, 224] and rows["simple_cnn"]["output"] == [2]
    assert rows["resnet50"]["output"] == [2]
    assert rows["simple_yolo"]["input"] == [3, 448, 448]
    assert rows["simple_yolo"]["output"] == [14, 14, 2 * 5 + len(DEFAULT_CLASSES["detect"])]
    assert rows["unet"]["output"] == [1, 256, 256] and rows["unet_small"]["output"] == [1, 256, 256]
    assert rows["thermal_cnn"]["input"] == [1, 224, 224] and rows["thermal_cnn"]["output"] == [3]
    # SimpleCNN: the chapter's 128×28×28 → 512 FC dominates its count.
    assert rows["simple_cnn"]["params"] > 128 * 28 * 28 * 512
    assert rows["unet"]["params"] > 10 * rows["unet_small"]["params"]


def test_every_architecture_builds_with_the_described_param_count():
    counts = {r["arch"]: r["params"] for r in describe()}
    for name in ALL_ARCHS:
        model = build(name)
        assert sum(p.numel() for p in model.parameters()) == counts[name], name
        assert ARCHS[name].task in DEFAULT_CLASSES


@pytest.mark.parametrize("name,shape", [
    ("simple_cnn", (2, 2)), ("compact_cnn", (2, 2)), ("small_resnet", (2, 2)), ("resnet18", (2, 2)),
    ("efficientnet_b0", (2, 2)),
    ("unet_small", (2, 1, 256, 256)),
    ("thermal_cnn", (2, 3)),
])
def test_forward_output_shapes(name, shape):
    info = ARCHS[name]
    model = build(name).eval()
    with torch.no_grad():
        y = model(torch.randn(2, info.channels, *info.input_size))
    assert tuple(y.shape) == shape


def test_small_resnet_starts_at_equal_odds_and_its_score_is_a_soft_maximum_over_places():
    from shared.models.gradcam import conv_layers

    model = build("small_resnet", num_classes=3).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x), torch.zeros(2, 3))  # ln(3) is the first loss, whatever the picture
        torch.nn.init.normal_(model.score.weight)
        places = model.score(model.features(x)).flatten(2)  # [2, 3, 14 * 14]
        y = model(x)
    assert places.shape[2] == 14 * 14
    # log-sum-exp pooling lies between the mean and the maximum of the places' scores, nearer the maximum
    assert bool(((y >= places.mean(2)) & (y <= places.amax(2))).all())
    # Grad-CAM's default layer (the last Conv2d) is the place scores themselves, after the last residual block
    assert conv_layers(model)[-2:] == ["features.6.body.3", "score"]


def test_simple_yolo_full_size_grid_and_num_classes():
    model = build("simple_yolo", num_classes=3).eval()
    with torch.no_grad():
        y = model(torch.randn(1, 3, 448, 448))
    assert tuple(y.shape) == (1, 14, 14, 13)


def test_unknown_architecture_names_it_and_the_known_ones():
    with pytest.raises(ValueError, match="'no_such_net'.*simple_cnn"):
        build("no_such_net")


def test_registering_a_name_twice_fails():
    with pytest.raises(ValueError, match="simple_cnn.*twice"):
        register("simple_cnn", task="classify", input_size=(224, 224))(lambda n: None)


def test_transfer_loads_imagenet_weights_then_freezes_backbone(tmp_path):
    import torchvision
    ref = torchvision.models.resnet18(weights=None)
    torch.save(ref.state_dict(), tmp_path / "r18.pt")
    model = build("resnet18", num_classes=4, pretrained=tmp_path / "r18.pt", freeze=True)
    assert torch.equal(model.conv1.weight, ref.conv1.weight)
    assert model.fc.out_features == 4
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}
    (tmp_path / "bad.pt").write_bytes(b"not a state dict")
    with pytest.raises(ModelError, match="bad.pt"):
        build("resnet18", pretrained=tmp_path / "bad.pt")


# ---- model directories ------------------------------------------------------------------------

def _small_yolo_meta() -> ModelMeta:
    meta = default_meta("simple_yolo", classes=["pump", "valve", "leak"])
    meta.options = {"width": 0.125}
    meta.input_size = (128, 128)
    return meta


@pytest.mark.parametrize("arch", ["simple_yolo", "thermal_cnn", "unet_small"])
def test_model_dir_round_trip_gives_identical_outputs(tmp_path, arch):
    meta = _small_yolo_meta() if arch == "simple_yolo" else default_meta(arch)
    meta.version, meta.metrics = "1.2.0", {"score": 0.5}
    model = build(arch, num_classes=len(meta.classes), **meta.options)
    with torch.no_grad():  # make BatchNorm running stats non-trivial so they must round-trip too
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
    model.eval()
    save_model_dir(tmp_path / "m", model, meta)
    assert json.loads((tmp_path / "m" / "model.json").read_text())["arch"] == arch
    loaded, meta2 = load_model_dir(tmp_path / "m", "cpu")
    assert meta2 == meta and not loaded.training
    x = torch.randn(1, meta.channels, 128, 128)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_default_meta_contents():
    d = default_meta("simple_yolo")
    assert (d.task, d.version, d.classes) == ("detect", "untrained", DEFAULT_CLASSES["detect"])
    assert set(d.thresholds) == {"conf", "iou"} and d.normalisation["mean"] == [0.485, 0.456, 0.406]
    t = default_meta("thermal_cnn")
    assert t.normalisation == {"mean": [300.0], "std": [100.0]} and t.thresholds == {"hotspot_k": 400.0}
    assert default_meta("unet").thresholds == {"mask": 0.5}
    assert ModelMeta.from_json(d.to_json()) == d


@pytest.fixture
def thermal_dir(tmp_path):
    return save_model_dir(tmp_path / "t", build("thermal_cnn"), default_meta("thermal_cnn"))


def _edit_json(d, **changes):
    f = d / "model.json"
    data = json.loads(f.read_text())
    for k, v in changes.items():
        if v is None:
            del data[k]
        else:
            data[k] = v
    f.write_text(json.dumps(data))


def test_bad_json_names_the_file(thermal_dir):
    (thermal_dir / "model.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"model\.json: not valid JSON"):
        load_model_dir(thermal_dir)


def test_missing_key_is_named(thermal_dir):
    _edit_json(thermal_dir, classes=None)
    with pytest.raises(ModelError, match=r"model\.json: missing key\(s\) classes"):
        load_model_dir(thermal_dir)


def test_unknown_arch_in_model_json_is_named(thermal_dir):
    _edit_json(thermal_dir, arch="thermal_transformer")
    with pytest.raises(ModelError, match=r"model\.json: unknown architecture 'thermal_transformer'"):
        load_model_dir(thermal_dir)


def test_arch_of_another_task_is_refused(thermal_dir):
    _edit_json(thermal_dir, arch="unet_small")
    with pytest.raises(ModelError, match="is a segment architecture, not thermal"):
        load_model_dir(thermal_dir)


def test_missing_files_are_named(tmp_path, thermal_dir):
    with pytest.raises(ModelError, match=r"model\.json: no such file"):
        load_model_dir(tmp_path / "nothing")
    (thermal_dir / "model.pt").unlink()
    with pytest.raises(ModelError, match=r"model\.pt: no such file"):
        load_model_dir(thermal_dir)


def test_state_dict_mismatch_is_named(tmp_path):
    meta = _small_yolo_meta()
    d = save_model_dir(tmp_path / "y", build("simple_yolo", 3, width=0.125), meta)
    _edit_json(d, classes=["pump"])
    with pytest.raises(ModelError, match=r"model\.pt: does not match 'simple_yolo' with 1 classes"):
        load_model_dir(d)
    (d / "model.pt").write_bytes(b"garbage")
    with pytest.raises(ModelError, match=r"model\.pt: not a loadable state dict"):
        load_model_dir(d)


# ---- detection: decoder and loss --------------------------------------------------------------

def _hand_raw() -> torch.Tensor:
    """2 images, S=2, B=2, C=2; image 0 has one box (plus a duplicate), image 1 nothing."""
    raw = torch.full((2, 2, 2, 12), -20.0)  # every confidence ≈ 0
    raw[..., 10:] = 0.0
    cell = raw[0, 1, 0]  # row 1, column 0
    cell[0:4] = 0.0  # x, y offsets 0.5; w, h half the image
    cell[4] = 0.0  # conf 0.5
    cell[5:9] = 0.0  # box 1: same box...
    cell[9] = -0.5  # ...with a lower confidence: a duplicate NMS must remove
    cell[10:12] = torch.tensor([0.0, math.log(3.0)])  # class probabilities 0.25 / 0.75
    return raw


def test_decode_yolo_returns_the_exact_box():
    dets = decode_yolo(_hand_raw(), conf_threshold=0.1, iou_threshold=0.5, input_size=448)
    assert len(dets) == 2 and dets[1].shape == (0, 6)
    assert dets[0].shape == (1, 6)
    x1, y1, x2, y2, score, cls = dets[0][0].tolist()
    # centre ((0 + 0.5)/2·448, (1 + 0.5)/2·448) = (112, 336), size 224×224
    assert (x1, y1, x2, y2, cls) == (0.0, 224.0, 224.0, 448.0, 1.0)
    assert score == pytest.approx(0.5 * 0.75, abs=1e-6)


def test_decode_yolo_nms_removes_the_duplicate():
    raw = _hand_raw()
    assert len(decode_yolo(raw, conf_threshold=0.1, iou_threshold=0.5, input_size=(448, 448))[0]) == 1
    both = decode_yolo(raw, conf_threshold=0.1, iou_threshold=1.0, input_size=(448, 448))[0]
    assert both.shape == (2, 6)  # IoU 1 is not above threshold 1: both survive, best first
    assert both[0, 4] > both[1, 4] and torch.equal(both[0, :4], both[1, :4])
    assert both[1, 4].item() == pytest.approx(torch.sigmoid(torch.tensor(-0.5)).item() * 0.75, abs=1e-6)


def test_yolo_loss_without_objects_is_the_noobj_term():
    raw = torch.randn(2, 3, 3, 15)
    conf = torch.sigmoid(raw[..., [4, 9]])
    expected = 0.5 * (conf ** 2).sum() / 2
    assert torch.allclose(yolo_loss(raw, [torch.zeros(0, 5), torch.zeros(0, 5)]), expected)


def test_yolo_loss_decreases_when_training_on_one_image():
    model = SimpleYOLO(num_classes=5, width=0.125).train()
    image = torch.rand(1, 3, 128, 128)  # S = 4
    targets = [torch.tensor([[2.0, 0.3, 0.6, 0.25, 0.4], [4.0, 0.8, 0.2, 0.1, 0.1]])]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss = yolo_loss(model(image), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0]


# ---- segmentation loss ------------------------------------------------------------------------

def test_dice_bce_loss_is_near_zero_when_right_and_large_when_wrong():
    target = torch.zeros(2, 1, 8, 8)
    target[:, :, 2:5, 2:5] = 1
    good = dice_bce_loss(target * 40 - 20, target)
    bad = dice_bce_loss(20 - target * 40, target)
    assert good.item() < 1e-3
    assert bad.item() > 10
    assert torch.allclose(dice_bce_loss(target * 40 - 20, target[:, 0]), good)  # [N,H,W] target too


def test_dice_bce_loss_pools_dice_over_the_batch_so_a_good_picture_costs_only_its_false_positives():
    # One picture of good product (empty mask) with a faint 1 % haze, one defective picture segmented exactly.
    target = torch.zeros(2, 1, 32, 32)
    target[1, :, 8:24, 8:24] = 1
    logits = torch.where(target > 0, torch.tensor(20.0), torch.tensor(math.log(0.01 / 0.99)))
    logits[1][target[1] == 0] = -20.0
    prob = logits.sigmoid()
    expected_dice = 2 * (prob * target).sum() / (prob.sum() + target.sum())  # Σ overlaps over Σ sizes
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    loss = dice_bce_loss(logits, target, smooth=0.0)
    assert loss.item() == pytest.approx((bce + 1 - expected_dice).item(), rel=1e-6)
    assert 1 - expected_dice.item() < 0.05  # averaged per picture, the haze alone would cost the Dice term ~0.5


# ---- thermal ----------------------------------------------------------------------------------

def test_radiometric_stats_exact():
    k = torch.tensor([[[1.0, 2.0], [3.0, 6.0]], [[300.25, 300.25], [300.25, 301.25]]], dtype=torch.float64)
    assert radiometric_stats(k).tolist() == [[6.0, 3.0, 1.0], [301.25, 300.5, 300.25]]


def test_find_hotspots_returns_exactly_the_two_peaks():
    k = torch.full((2, 40, 50), 300.0, dtype=torch.float64)
    yy, xx = torch.meshgrid(torch.arange(40), torch.arange(50), indexing="ij")
    for x, y, peak in ((10, 5, 450.5), (30, 20, 420.25), (42, 33, 390.0)):  # the last is below threshold
        bump = peak - 8.0 * ((xx - x) ** 2 + (yy - y) ** 2).double().sqrt()
        k[0] = torch.maximum(k[0], bump)
    spots = find_hotspots(k, threshold_k=400.0, max_spots=8, radius=5)
    assert spots == [[[10, 5, 450.5], [30, 20, 420.25]], []]
    assert find_hotspots(k, threshold_k=400.0, max_spots=1) == [[[10, 5, 450.5]], []]


# ---- Predictor --------------------------------------------------------------------------------

def test_predictor_classify():
    p = Predictor.from_spec("classify", arch="simple_cnn")
    assert p.name == "simple_cnn@untrained" and p.input_size() == (224, 224) and p.device == torch.device("cpu")
    out = p.predict(torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8))
    assert len(out) == 2
    for o in out:
        assert set(o) == {"label", "index", "probs", "classes"}
        assert o["classes"] == ["normal", "anomaly"] and o["label"] == o["classes"][o["index"]]
        assert type(o["index"]) is int and all(type(v) is float for v in o["probs"])
        assert sum(o["probs"]) == pytest.approx(1.0, abs=1e-5)


def test_predictor_detect_from_model_dir(tmp_path):
    meta = _small_yolo_meta()
    meta.thresholds = {"conf": 0.0, "iou": 0.5}  # keep boxes so their types are checked
    save_model_dir(tmp_path / "d", build("simple_yolo", 3, width=0.125), meta)
    p = Predictor.from_spec("detect", path=str(tmp_path / "d"))
    out = p.predict(torch.randint(0, 256, (2, 128, 128, 3), dtype=torch.uint8))
    assert len(out) == 2
    for o in out:
        assert set(o) == {"boxes", "classes"} and o["classes"] == ["pump", "valve", "leak"]
        assert len(o["boxes"]) > 0
        for b in o["boxes"]:
            assert all(type(v) is float for v in b[:5]) and type(b[5]) is int and 0 <= b[5] < 3
            assert 0 <= b[0] <= b[2] <= 128 and 0 <= b[1] <= b[3] <= 128


def test_predictor_segment():
    p = Predictor.from_spec("segment", arch="unet_small")
    out = p.predict(torch.randint(0, 256, (2, 256, 256, 3), dtype=torch.uint8))
    assert len(out) == 2
    for o in out:
        assert set(o) == {"mask", "prob_max"}
        assert isinstance(o["mask"], np.ndarray) and o["mask"].dtype == np.uint8 and o["mask"].shape == (256, 256)
        assert set(np.unique(o["mask"])) <= {0, 1}
        assert type(o["prob_max"]) is float and bool(o["mask"].any()) == (o["prob_max"] > 0.5)


def test_predictor_thermal_radiometric_is_exact():
    p = Predictor.from_spec("thermal", arch="thermal_cnn")
    ck = torch.full((2, 120, 160, 1), 29815, dtype=torch.int32)
    ck[0, 30, 40, 0] = 45000  # one hot spot at x=40, y=30
    ck[1, 0, 0, 0] = 28000
    out = p.predict(ck.to(torch.uint16))
    arr = ck[..., 0].numpy().astype(np.float64) / 100
    for o, a in zip(out, arr):
        assert set(o) == {"max_k", "avg_k", "min_k", "hotspots", "source", "cnn"} and o["source"] == "radiometric"
        assert (o["max_k"], o["min_k"]) == (a.max(), a.min())
        assert o["avg_k"] == pytest.approx(a.mean(), abs=1e-9)
        assert len(o["cnn"]) == 3 and all(type(v) is float for v in o["cnn"])
    assert out[0]["hotspots"] == [[40, 30, 450.0]] and out[1]["hotspots"] == []


def test_predictor_thermal_uint8_uses_the_cnn():
    p = Predictor.from_spec("thermal", arch="thermal_cnn")
    out = p.predict(torch.randint(0, 256, (2, 100, 90, 1), dtype=torch.uint8))
    for o in out:
        assert o["source"] == "cnn" and o["hotspots"] == []
        assert [o["max_k"], o["avg_k"], o["min_k"]] == o["cnn"] and all(type(v) is float for v in o["cnn"])


def test_predictor_refuses_wrong_task_spec_and_batch(thermal_dir):
    with pytest.raises(ModelError, match="is a thermal model, not a detect model"):
        Predictor.from_spec("detect", path=str(thermal_dir))
    with pytest.raises(ModelError, match="is a segment model, not a classify model"):
        Predictor.from_spec("classify", arch="unet_small")
    with pytest.raises(ModelError, match="give a model directory path or an architecture name"):
        Predictor.from_spec("classify")
    p = Predictor.from_spec("segment", arch="unet_small")
    with pytest.raises(ValueError, match=r"expected \(256, 256\) frames"):
        p.predict(torch.zeros(1, 128, 128, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="expected uint8 frames"):
        p.predict(torch.zeros(1, 256, 256, 3, dtype=torch.float32))


def test_chapter_output_shapes():
    """The chapter's shapes: SimpleYOLO [4,14,14,11] at 448 (1 class, 2 boxes), U-Net [4,1,256,256],
    ThermalCNN [B,3]."""
    with torch.no_grad():
        assert tuple(build("simple_yolo", num_classes=1).eval()(torch.randn(4, 3, 448, 448)).shape) == (4, 14, 14, 11)
        unet = build("unet").to("meta").eval()  # full width: shapes only, on the meta device
        assert tuple(unet(torch.empty(4, 3, 256, 256, device="meta")).shape) == (4, 1, 256, 256)
        assert tuple(build("thermal_cnn").eval()(torch.randn(5, 1, 224, 224)).shape) == (5, 3)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_normalise_is_x_over_255_minus_mean_over_std_in_the_engine_layout(memory_format):
    p = Predictor.from_spec("classify", arch="simple_cnn")
    p._memory_format = memory_format
    batch = torch.randint(0, 256, (3, 224, 224, 3), dtype=torch.uint8)
    x = p._normalise(batch)
    mean = torch.tensor(p.meta.normalisation["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(p.meta.normalisation["std"]).view(1, 3, 1, 1)
    want = (batch.permute(0, 3, 1, 2).float() / 255 - mean) / std
    assert x.shape == (3, 3, 224, 224) and x.dtype == torch.float32 and x.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(x, want, rtol=0, atol=1e-5)
