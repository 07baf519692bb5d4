"""The starting points people compare against, offline, with files the tests make: torchvision's ImageNet weights
through its weights API (a file placed in the torch.hub cache), timm ResNets (.pth and .safetensors) and
torchxrayvision ResNets (1-channel conv1, [-1024, 1024] input), each refused loudly when it does not fit."""
import pytest
import torch
import torchvision

import finetune
from adam import imagenet_normalise

ARCH = "resnet18"
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny workloads run on one thread


def _randomised(model, seed=0):
    """Non-default weights and BatchNorm buffers, so a silent fresh initialisation cannot pass."""
    torch.manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
            mod.weight.data.normal_(0, 0.05)
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)
    return model.eval()


def _assert_same(backbone, sd):
    got = backbone.state_dict()
    want = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_imagenet_through_torchvision_weights_api(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    cached = tmp_path / "torch" / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[-1]
    cached.parent.mkdir(parents=True)
    sd = _randomised(torchvision.models.resnet18()).state_dict()
    torch.save(sd, cached)                                   # the file a download would have put there
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: pytest.fail("must read the cached file, not download"))
    _assert_same(finetune.load_backbone("imagenet", ARCH), sd)
    _assert_same(finetune.load_backbone("imagenet:IMAGENET1K_V1", ARCH), sd)
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        finetune.load_backbone("imagenet:IMAGENET1K_V9", ARCH)
    torch.save(torchvision.models.resnet34().state_dict(), cached)   # a wrong file in the cache
    with pytest.raises(ValueError, match="unexpected.*delete it to download again"):
        finetune.load_backbone("imagenet", ARCH)
    cached.unlink()                                          # offline and no file: say where it goes

    def offline(*a, **k):
        raise OSError("network is unreachable")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ValueError, match=f"put that file at {cached}"):
        finetune.load_backbone("imagenet", ARCH)


def test_timm_resnet_state_dicts(tmp_path):
    timm = pytest.importorskip("timm")
    net = _randomised(timm.create_model("resnet18", pretrained=False))
    sd = net.state_dict()
    torch.save(sd, tmp_path / "timm.pth")
    x = torch.randn(2, 3, 64, 64)
    for path in [tmp_path / "timm.pth"] + ([tmp_path / "model.safetensors"] if _save_safetensors(sd, tmp_path) else []):
        bb = finetune.load_backbone(f"timm:{path}", ARCH).eval()
        _assert_same(bb, sd)
        with torch.no_grad():                               # the same network, not just the same names
            torch.testing.assert_close(bb(x), net.forward_head(net.forward_features(x), pre_logits=True))
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "train.pth.tar")   # timm's training checkpoints
    _assert_same(finetune.load_backbone(f"timm:{tmp_path / 'train.pth.tar'}", ARCH), sd)
    torch.save(timm.create_model("resnet18d", pretrained=False).state_dict(), tmp_path / "deep_stem.pth")
    with pytest.raises(ValueError, match="missing: conv1.weight.*deep stem"):
        finetune.load_backbone(f"timm:{tmp_path / 'deep_stem.pth'}", ARCH)


def _save_safetensors(sd, folder):
    try:
        from safetensors.torch import save_file
    except ImportError:
        return False
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    return True


def _xrv_resnet(seed=0):
    """What torchxrayvision's ResNet holds (xrv.models.ResNet): a torchvision ResNet with a 1-channel conv1 and
    an 18-way fc, whose state dict is the weights file."""
    m = torchvision.models.resnet18(num_classes=18)
    m.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return _randomised(m, seed)


def test_xrv_resnet_converted_to_imagenet_input(tmp_path):
    xrv = _xrv_resnet()
    torch.save(xrv.state_dict(), tmp_path / "xrv.pt")
    ours = finetune.load_backbone(f"xrv:{tmp_path / 'xrv.pt'}", ARCH).eval()
    assert ours.conv1.weight.shape == (64, 3, 7, 7)
    keep = {k: v for k, v in xrv.state_dict().items() if not k.startswith(("fc.", "conv1.", "bn1.running_mean"))}
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in keep.items())
    g = torch.rand(2, 1, 64, 64)                             # grey images in [0, 1]
    x_xrv = 2048 * g - 1024                                 # torchxrayvision's intensity convention
    x_ours = imagenet_normalise(g)                          # what finetune.py and eve.py feed a backbone
    xrv.fc = torch.nn.Identity()
    # conv1's zero padding stands for another grey level in each convention (docstring of xrv_to_imagenet_input):
    # without padding the two networks must agree everywhere; with it, away from the border.
    for m in (xrv, ours):
        m.conv1.padding = (0, 0)
    with torch.no_grad():
        want, got = xrv(x_xrv), ours(x_ours)
    # float32 sums over inputs of size ~1e3 in conv1, then 17 layers: 1e-4 of the feature scale
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    for m in (xrv, ours):
        m.conv1.padding = (3, 3)
    with torch.no_grad():
        a = xrv.bn1(xrv.conv1(x_xrv))[..., 2:-2, 2:-2]       # outputs whose 7x7 window lies inside the image
        b = ours.bn1(ours.conv1(x_ours))[..., 2:-2, 2:-2]
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * a.abs().max().item())


def test_xrv_mismatches_are_refused(tmp_path):
    torch.save(_randomised(torchvision.models.resnet18()).state_dict(), tmp_path / "rgb.pt")
    with pytest.raises(ValueError, match=r"conv1.weight \(64, 3, 7, 7\), not torchxrayvision's 1-channel"):
        finetune.load_backbone(f"xrv:{tmp_path / 'rgb.pt'}", ARCH)
    dense = torchvision.models.densenet121()
    torch.save(dense.state_dict(), tmp_path / "densenet.pt")
    with pytest.raises(ValueError, match="no conv1.weight.*ResNet weights"):
        finetune.load_backbone(f"xrv:{tmp_path / 'densenet.pt'}", ARCH)
    xrv50 = _xrv_resnet()
    torch.save(xrv50.state_dict(), tmp_path / "xrv18.pt")
    with pytest.raises(ValueError, match="does not hold a complete resnet50 backbone"):
        finetune.load_backbone(f"xrv:{tmp_path / 'xrv18.pt'}", "resnet50")
