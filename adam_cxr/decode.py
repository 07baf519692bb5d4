"""Decoding one image: read_image, the one reader of every script (data_prep's converters, adam.py's folder source,
eve.py). numpy + pillow; pydicom is imported when a DICOM file is met.

Documented pixel recipe (tests recompute it with PIL the same way):
  orientation: an EXIF Orientation tag (phone photos, some scanners) is applied (ImageOps.exif_transpose).
  grey:  PIL Image.convert("L")  (ITU-R 601-2 luma, alpha ignored: a grey image stored as RGBA with
         R=G=B keeps its values); 16-bit PNGs ("I;16", "I") and float images are min-max scaled to 0..255 first.
  RGB:   Image.convert("RGB").  JPEGs are decoded with Image.draft(mode, (size, size)), i.e. by libjpeg's
         DCT scaling at the smallest 1/2, 1/4, 1/8 scale still >= size (a 3888x2592 photo decodes at 1/4
         of its side for 512 px: a fraction of the full decode's time).
  size:  Image.resize(..., Image.BILINEAR) (PIL filters with the full support when shrinking, so this is
         antialiased); masks use Image.NEAREST and are then thresholded at > 0.
  fit:   "pad": resized to (round(w * size / m), round(h * size / m)), m = max(w, h), then centred on a black
         size x size square; "crop": the centred square, resized to size x size; "stretch": resized to size x size.
  refused: a side under MIN_SIDE (8) px. Warned: a 16-bit or float image that comes out nearly uniform.
  DICOM: dicom_to_grey; JSRT raw: jsrt_to_grey.
"""
import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


MIN_SIDE = 8      # the smallest --size: an image with a shorter side (a 1x1 placeholder) holds no anatomy to learn
FLAT_LEVELS = 8   # a scaled 16-bit image whose 1st..99th percentiles lie within fewer grey levels is near-uniform


def _to_mode(im, channels):
    """-> (the image in "L" or "RGB", a warning or None). A 16-bit or float image is min-max scaled to 0..255; when
    98 % of its pixels then lie within fewer than FLAT_LEVELS grey levels (a constant image, or a near-constant one
    whose few outlying pixels, such as a hot pixel, take the whole range) it is nearly uniform, mostly black, and
    the warning says so."""
    warning = None
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, np.float64)
        lo, hi = a.min(), a.max()
        g = np.rint((a - lo) * 255 / max(hi - lo, 1)).astype(np.uint8)
        cdf = np.cumsum(np.bincount(g.ravel(), minlength=256))
        p1, p99 = np.searchsorted(cdf, [0.01 * g.size, 0.99 * g.size])   # grey levels of the 1st, 99th percentile
        if p99 - p1 < FLAT_LEVELS:
            warning = (f"{im.mode} values {lo:g}..{hi:g}, but 98 % of the pixels fall within {p99 - p1 + 1} grey "
                       f"level(s) of 256 once scaled to 8 bits: the image is nearly uniform (mostly black); check it "
                       f"(a blank exposure, or a few outlying pixels)")
        im = Image.fromarray(g)
    return im.convert("L" if channels == 1 else "RGB"), warning


def _fit(im, size, fit, resample=Image.BILINEAR):
    """The recipe's fit and size. "pad" resizes the image to fit the square first (its sides scaled by
    size / max(w, h) and rounded), then centres it on the black square: padding first would allocate a
    max(w, h)^2 canvas, 9.3 GiB for a 100000 x 8 px strip, where this allocates about the output."""
    w, h = im.size
    if fit == "crop" and w != h:
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    elif fit == "pad" and w != h:
        s = max(w, h)
        fw, fh = max(1, round(w * size / s)), max(1, round(h * size / s))
        canvas = Image.new(im.mode, (size, size), 0)
        canvas.paste(im.resize((fw, fh), resample), ((size - fw) // 2, (size - fh) // 2))
        return canvas
    if im.size != (size, size):
        im = im.resize((size, size), resample)
    return im


def read_image(src, channels=1, size=None, fit="pad", decoder="auto", dicom_window="header",
               resample=Image.BILINEAR):
    """src (a path, or the bytes of an archive member) -> (PIL image in "L" for channels 1 or "RGB", {"size": "WxH",
    "mode": what the source was, and "warning" when the image came out nearly uniform}) by the recipe above, fitted
    to size x size when size is given. decoder "auto": DICOM by its suffix or its DICM preamble, anything else
    through PIL; or "pil", "dicom", "jsrt". ValueError for an image with a side under MIN_SIDE px (the caller
    names the file)."""
    path = None if isinstance(src, bytes) else Path(src)
    if decoder == "auto":
        decoder = "dicom" if path is not None and _is_dicom(path) else "pil"
    if decoder == "jsrt":
        im = jsrt_to_grey(src if path is None else path.read_bytes(), str(path or "<bytes>"))
        info = {"size": f"{im.size[0]}x{im.size[1]}", "mode": "12-bit raw"}
    elif decoder == "dicom":
        im, _ = dicom_to_grey(src, dicom_window)
        info = {"size": f"{im.size[0]}x{im.size[1]}", "mode": "DICOM"}
    else:
        im = Image.open(io.BytesIO(src) if path is None else path)
        if im.format == "JPEG" and size:
            im.draft("L" if channels == 1 else "RGB", (size, size))
        im.load()                                    # raises on truncated / corrupt files
        info = {"size": f"{im.size[0]}x{im.size[1]}", "mode": im.mode}
        if im.getexif().get(0x0112, 1) != 1:         # EXIF Orientation: the stored pixels are rotated or mirrored
            im = ImageOps.exif_transpose(im)
    if min(im.size) < MIN_SIDE:
        raise ValueError(f"a {im.size[0]}x{im.size[1]} px image is too small to learn anatomy from (at least "
                         f"{MIN_SIDE} px a side); remove it")
    im, warning = _to_mode(im, channels)
    if warning:
        info["warning"] = warning
    return (_fit(im, size, fit, resample) if size else im), info


def _is_dicom(path):
    suffix = path.suffix.lower()
    if suffix in (".dcm", ".dicom"):
        return True
    if suffix in (".png", ".jpg", ".jpeg"):
        return False
    with open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM"


def jsrt_to_grey(raw, path="<bytes>"):
    """JSRT .IMG: headerless big-endian 12-bit square image (2048 x 2048 in the real set; the side is taken from
    the file size, so small fakes work). Stored as a negative: grey = 255 - round(v * 255 / 4095)."""
    n = len(raw) // 2
    side = math.isqrt(n)
    if side * side * 2 != len(raw) or side == 0:
        raise ValueError(f"{path}: {len(raw)} bytes is not a square 16-bit raw image (JSRT is 2048x2048x2 bytes)")
    a = np.frombuffer(raw, ">u2").reshape(side, side).astype(np.int32)
    if a.max() > 4095:
        raise ValueError(f"{path}: values up to {a.max()}, not 12-bit; is this a JSRT .IMG file?")
    return Image.fromarray((255 - (a * 255 + 2047) // 4095).astype(np.uint8))


def voi_output_range(ds):
    """(lo, hi): the range of what pydicom's apply_voi_lut returns for `ds` (DICOM PS3.3 C.11.2), the range that
    dicom_to_grey maps to 0..255. VOI LUT Sequence: 0 .. 2^n - 1 with n its LUT Descriptor's third value
    (bits per entry). Window (LINEAR, LINEAR_EXACT, SIGMOID): the modality output range, as apply_windowing
    computes it: 0 .. 2^n - 1 of a Modality LUT Sequence, else the stored range (BitsStored, signed or not)
    through RescaleSlope / RescaleIntercept."""
    if ds.get("VOILUTSequence"):
        return 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    if ds.get("ModalityLUTSequence"):
        lo, hi = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif ds.get("PixelRepresentation", 0) == 0:
        lo, hi = 0.0, float(2 ** int(ds.BitsStored) - 1)
    else:
        lo, hi = -float(2 ** (int(ds.BitsStored) - 1)), float(2 ** (int(ds.BitsStored) - 1) - 1)
    if ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None:
        slope, icpt = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        lo, hi = sorted((lo * slope + icpt, hi * slope + icpt))
    return lo, hi


def dicom_to_grey(path, window="header"):
    """DICOM -> 8-bit grey, by the standard's pipeline as pydicom implements it (PS3.3 C.11):
    1. modality LUT: pydicom.pixels.apply_modality_lut (Modality LUT Sequence, else RescaleSlope/Intercept);
    2. VOI LUT: pydicom.pixels.apply_voi_lut with the file's first VOI (its VOI LUT Sequence, else its first
       WindowCenter/WindowWidth with VOILUTFunction LINEAR, LINEAR_EXACT or SIGMOID), whose output range
       (voi_output_range) is mapped linearly to 0..255 and rounded;
       a file that carries no VOI, or window="percentile", gets the image's own 1st..99th percentiles instead
       (also the choice for files whose header window spans the whole stored range, such as pydicom-data's
       RG1_UNCR.dcm, which its header window renders almost flat);
    3. MONOCHROME1 (bright = air) is inverted after rounding, so bone is bright as usual and the inversion exact.
    Multi-frame files: the first frame. Returns (PIL image, patient id)."""
    import pydicom                                   # lazy: only DICOM sources need it
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
    ds = pydicom.dcmread(path)
    a = ds.pixel_array
    if a.ndim == 3 and ds.get("SamplesPerPixel", 1) == 1:
        a = a[0]                                     # multi-frame: first frame
    patient = str(ds.get("PatientID", "") or "")
    if a.ndim == 3:                                  # colour DICOM
        return Image.fromarray(a.astype(np.uint8)).convert("L"), patient
    a = apply_modality_lut(a, ds)
    has_voi = bool(ds.get("VOILUTSequence")) or (ds.get("WindowCenter") is not None
                                                  and ds.get("WindowWidth") is not None)
    if window == "header" and has_voi:
        v = apply_voi_lut(a, ds, index=0).astype(np.float64)
        lo, hi = voi_output_range(ds)
    else:
        v = np.asarray(a, np.float64)
        lo, hi = np.percentile(v, [1, 99])
    g = np.rint(np.clip((v - lo) / max(hi - lo, 1e-9), 0, 1) * 255).astype(np.uint8)
    if ds.get("PhotometricInterpretation", "") == "MONOCHROME1":
        g = 255 - g                                  # after rounding, so the inversion is exact
    return Image.fromarray(g), patient

