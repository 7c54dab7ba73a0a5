"""MR contrast of the phantoms: MPRAGE / MP2RAGE signal equations, B1 fields, noise, file scaling.

Signals come from the Bloch equations of the inversion-recovery gradient-echo sequences, not from
hand-picked grey levels: each tissue has a T1 and a proton density (PD); the longitudinal
magnetisation is followed through one repetition as a chain of affine maps (M -> a*M + b*M0),
whose fixed point is the steady state. The signal of a readout train is sampled at its centre
(linear phase encoding: the k-space centre is half-way through the train).

Voxels mix tissues by volume fraction and the *complex* signals add, so partial volume behaves as
in a scanner, including the sign of the first MP2RAGE inversion.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bids_cl.synth.geometry import coarse_axes, upsample_linear

#: signal classes, in the order of the fraction stacks given to ``synthesize``
CLASSES = ("wm", "gm", "csf", "lwm", "lgm", "fat", "bone")


@dataclass(frozen=True)
class Tissue:
    t1_ms: float
    pd: float  # relative proton density (water = 1)


#: relaxation times at 3 T and 7 T (values of the order reported in the MP2RAGE literature).
#: Lesions ("lwm", "lgm": the lesioned part of WM and GM) have a longer T1 (demyelination, oedema:
#: hypointense on T1w and UNI) and ~25% more free water (higher PD: iso- to slightly hyperintense on
#: INV2). See docs/phantoms.md for the measured contrasts. "fat" (scalp, marrow) has a low effective
#: PD (short T2*, chemical shift) so that it is ~1.4x WM on MPRAGE, as in scans.
TISSUES: dict[float, dict[str, Tissue]] = {
    3.0: {
        "wm": Tissue(850.0, 0.69),
        "gm": Tissue(1350.0, 0.80),
        "csf": Tissue(4000.0, 1.00),
        "lwm": Tissue(850.0 * 1.5, 0.69 * 1.25),
        "lgm": Tissue(1350.0 * 1.35, 0.80 * 1.22),
        "fat": Tissue(380.0, 0.50),
        "bone": Tissue(250.0, 0.01),
    },
    7.0: {
        "wm": Tissue(1180.0, 0.69),
        "gm": Tissue(1950.0, 0.80),
        "csf": Tissue(4400.0, 1.00),
        # UNI is steeper in T1 at 7 T (GM sits mid-curve): smaller T1 changes give the same look
        "lwm": Tissue(1180.0 * 1.35, 0.69 * 1.25),
        "lgm": Tissue(1950.0 * 1.2, 0.80 * 1.22),
        "fat": Tissue(450.0, 0.50),
        "bone": Tissue(300.0, 0.01),
    },
}


@dataclass(frozen=True)
class MP2RAGEProtocol:
    """Times in ms, angles in degrees; ``n_shots`` excitations per readout train."""

    tr_ms: float  # time between two inversions (RepetitionTimePreparation)
    ti1_ms: float
    ti2_ms: float
    flip1_deg: float
    flip2_deg: float
    n_shots: int
    esp_ms: float  # time between two excitations (RepetitionTimeExcitation)
    echo_time_ms: float
    inversion_efficiency: float = 0.96


@dataclass(frozen=True)
class MPRAGEProtocol:
    tr_ms: float  # time between two inversions
    ti_ms: float
    flip_deg: float
    n_shots: int
    esp_ms: float
    echo_time_ms: float
    inversion_efficiency: float = 0.96


#: usual research protocols (3 T: 1 mm; 7 T: 0.75 mm)
MP2RAGE: dict[float, MP2RAGEProtocol] = {
    3.0: MP2RAGEProtocol(5000.0, 700.0, 2500.0, 4.0, 5.0, 176, 7.1, 2.9),
    7.0: MP2RAGEProtocol(5000.0, 900.0, 2750.0, 5.0, 3.0, 176, 6.9, 2.3),
}
MPRAGE: dict[float, MPRAGEProtocol] = {
    3.0: MPRAGEProtocol(2300.0, 900.0, 9.0, 176, 7.1, 2.98),
    7.0: MPRAGEProtocol(2800.0, 1100.0, 7.0, 192, 6.9, 2.5),
}

#: signal-to-noise ratio of white matter in the reference image (INV2 or T1w); kept the same for
#: the tiny grid so the images look alike at every size
SNR: dict[float, float] = {3.0: 40.0, 7.0: 30.0}

#: file scaling: UNI spans 0..4095 (Siemens); INV2 / T1w white matter sits at these values
UNI_RANGE = 4095.0
WM_LEVEL = {"inv": 1500.0, "t1w": 1800.0}


# ----------------------------------------------------------------------------------------------
# Bloch equations (pure, vectorised over T1 arrays)


def _relax(t_ms: float, t1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    e = np.exp(-t_ms / t1)
    return e, 1.0 - e


def _train(n: int, flip_rad: np.ndarray, esp_ms: float, t1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``n`` excitations, each followed by ``esp_ms`` of recovery, as one affine map."""
    e = np.exp(-esp_ms / t1)
    a1 = np.cos(flip_rad) * e
    an = a1**n
    return an, (1.0 - e) * (1.0 - an) / (1.0 - a1)


def _then(first: tuple, second: tuple) -> tuple:
    """Apply ``first`` then ``second`` (both M -> a*M + b)."""
    return second[0] * first[0], second[0] * first[1] + second[1]


def _ir_readouts(
    t1: np.ndarray,
    tr: float,
    tis: Sequence[float],
    flips_rad: Sequence[np.ndarray],
    n: int,
    esp: float,
    efficiency: float,
) -> list[np.ndarray]:
    """Signed signals (per unit M0) of inversion-recovery readouts at inversion times ``tis``."""
    half = n // 2
    steps: list[tuple] = [(-efficiency * np.ones_like(t1), np.zeros_like(t1))]  # inversion
    marks: list[int] = []
    t = 0.0
    for ti, flip in zip(tis, flips_rad, strict=True):
        gap = ti - half * esp - t
        if gap < 0:
            raise ValueError("readout trains overlap: inversion times too close for the train length")
        steps.append(_relax(gap, t1))
        steps.append(_train(half, flip, esp, t1))
        marks.append(len(steps))  # signal sampled after these steps (k-space centre)
        steps.append(_train(n - half, flip, esp, t1))
        t = ti + (n - half) * esp
    if tr - t < 0:
        raise ValueError("repetition time shorter than the readouts")
    steps.append(_relax(tr - t, t1))
    total = (np.ones_like(t1), np.zeros_like(t1))
    for step in steps:
        total = _then(total, step)
    m = total[1] / (1.0 - total[0])  # steady state just before the inversion
    signals, done = [], 0
    for mark, flip in zip(marks, flips_rad, strict=True):
        for step in steps[done:mark]:
            m = step[0] * m + step[1]
        done = mark
        signals.append(m * np.sin(flip))
    return signals


def mp2rage_signals(
    t1_ms: np.ndarray, b1: np.ndarray, protocol: MP2RAGEProtocol
) -> tuple[np.ndarray, np.ndarray]:
    """Signed INV1 and INV2 signals per unit proton density; ``b1`` scales the flip angles."""
    t1, b1 = np.broadcast_arrays(np.asarray(t1_ms, float), np.asarray(b1, float))
    s1, s2 = _ir_readouts(
        t1,
        protocol.tr_ms,
        (protocol.ti1_ms, protocol.ti2_ms),
        (np.deg2rad(protocol.flip1_deg) * b1, np.deg2rad(protocol.flip2_deg) * b1),
        protocol.n_shots,
        protocol.esp_ms,
        protocol.inversion_efficiency,
    )
    return s1, s2


def mprage_signal(t1_ms: np.ndarray, b1: np.ndarray, protocol: MPRAGEProtocol) -> np.ndarray:
    """Signed MPRAGE signal per unit proton density (the image is its magnitude)."""
    t1, b1 = np.broadcast_arrays(np.asarray(t1_ms, float), np.asarray(b1, float))
    (s,) = _ir_readouts(
        t1, protocol.tr_ms, (protocol.ti_ms,), (np.deg2rad(protocol.flip_deg) * b1,),
        protocol.n_shots, protocol.esp_ms, protocol.inversion_efficiency,
    )
    return s


def uni_combination(inv1: np.ndarray, inv2: np.ndarray) -> np.ndarray:
    """MP2RAGE uniform image Re(conj(INV1) INV2) / (|INV1|^2 + |INV2|^2), in [-0.5, 0.5].

    Receive bias and proton density cancel; where both inputs are noise (air, bone) the ratio is
    random, which is the salt-and-pepper background of real UNI images. Complex inputs.
    """
    return uni_from_parts(np.real(inv1), np.imag(inv1), np.real(inv2), np.imag(inv2))


def uni_from_parts(re1: np.ndarray, im1: np.ndarray, re2: np.ndarray, im2: np.ndarray) -> np.ndarray:
    """``uni_combination`` on real and imaginary parts (saves complex temporaries on big grids)."""
    num = re1 * re2 + im1 * im2
    den = re1 * re1 + im1 * im1 + re2 * re2 + im2 * im2
    return np.divide(num, den, out=np.zeros(num.shape, np.float32), where=den > 0).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# mixing, fields, noise


#: B1+ (transmit) values at which signal tables are computed; voxels interpolate between them
B1_GRID = np.linspace(0.3, 1.7, 57)


def signal_tables(field_t: float, sequence: str) -> np.ndarray:
    """(n_images, len(CLASSES), len(B1_GRID)) signed signals incl. proton density.

    n_images is 2 (INV1, INV2) for ``mp2rage`` and 1 for ``mprage``.
    """
    tissues = TISSUES[field_t]
    t1 = np.array([tissues[c].t1_ms for c in CLASSES])[:, None]
    pd = np.array([tissues[c].pd for c in CLASSES])[:, None]
    b1 = B1_GRID[None, :]
    if sequence == "mp2rage":
        s1, s2 = mp2rage_signals(t1, b1, MP2RAGE[field_t])
        return np.stack([pd * s1, pd * s2])
    if sequence == "mprage":
        return (pd * mprage_signal(t1, b1, MPRAGE[field_t]))[None]
    raise ValueError(f"unknown sequence {sequence!r}")


#: degree of the polynomial in B1 that replaces the tables per voxel (error < 0.2% of WM signal)
_B1_DEGREE = 5


def b1_polynomials(tables: np.ndarray) -> np.ndarray:
    """Fit each table over B1_GRID by a polynomial in (b1 - 1): (n_images, C, degree + 1).

    Coefficients are highest degree first (``np.polyval`` order).
    """
    x = B1_GRID - 1.0
    out = np.empty((*tables.shape[:2], _B1_DEGREE + 1))
    for k in range(tables.shape[0]):
        for c in range(tables.shape[1]):
            out[k, c] = np.polyfit(x, tables[k, c], _B1_DEGREE)
    return out


def synthesize(
    fractions: np.ndarray, b1: np.ndarray, tables: np.ndarray, chunk_voxels: int = 1 << 21
) -> np.ndarray:
    """Noise-free signed signals (n_images, *grid) of voxels mixing CLASSES by volume fraction.

    ``fractions`` is (len(CLASSES), *grid); air is what the fractions leave and gives no signal.
    The signal is linear in the fractions and smooth in B1, so per voxel it is a polynomial in B1
    whose coefficients are one small matrix product with the fractions (fast, no table look-up).
    """
    coef = b1_polynomials(tables).astype(np.float32)  # (K, C, P)
    n_img, n_cls, n_pow = coef.shape
    flat_f = fractions.reshape(n_cls, -1)
    flat_b = b1.reshape(-1)
    out = np.empty((n_img, flat_b.size), np.float32)
    mat = coef.transpose(0, 2, 1).reshape(n_img * n_pow, n_cls)
    for i0 in range(0, flat_b.size, chunk_voxels):
        i1 = min(flat_b.size, i0 + chunk_voxels)
        x = np.clip(flat_b[i0:i1], B1_GRID[0], B1_GRID[-1]) - np.float32(1.0)
        poly = (mat @ flat_f[:, i0:i1]).reshape(n_img, n_pow, -1)
        acc = poly[:, 0].copy()
        for j in range(1, n_pow):  # Horner
            acc *= x
            acc += poly[:, j]
        out[:, i0:i1] = acc
    return out.reshape(n_img, *b1.shape)


def lesion_mixture(
    gm: np.ndarray, wm: np.ndarray, csf: np.ndarray, fat: np.ndarray, bone: np.ndarray,
    lesion: np.ndarray,
) -> np.ndarray:
    """Stack CLASSES fractions: the lesion takes its share of the parenchyma, CSF is untouched."""
    return np.stack([
        wm * (1.0 - lesion), gm * (1.0 - lesion), csf, wm * lesion, gm * lesion, fat, bone,
    ]).astype(np.float32)


def smooth_field(
    rng: np.random.Generator,
    vox2world: np.ndarray,
    shape: tuple[int, int, int],
    n_waves: int = 6,
    wavelength_mm: tuple[float, float] = (150.0, 400.0),
    coarse_mm: float = 8.0,
) -> np.ndarray:
    """A smooth random field in world space, zero mean, unit standard deviation (float32).

    A sum of plane waves with long wavelengths, evaluated on a coarse grid and interpolated:
    scanner B1 fields vary over many centimetres.
    """
    dirs = rng.normal(size=(n_waves, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    k = 2 * np.pi / rng.uniform(*wavelength_mm, n_waves)
    phase = rng.uniform(0, 2 * np.pi, n_waves)
    amp = rng.normal(size=n_waves)
    axes = coarse_axes(vox2world, shape, coarse_mm)
    ijk = np.stack(np.meshgrid(*axes, indexing="ij")).reshape(3, -1)
    world = vox2world[:3, :3] @ ijk + vox2world[:3, 3:4]
    values = (amp[:, None] * np.cos(k[:, None] * (dirs @ world) + phase[:, None])).sum(axis=0)
    values = (values - values.mean()) / max(values.std(), 1e-9)
    return upsample_linear(values.reshape([len(a) for a in axes]), shape)


def transmit_field(
    rng: np.random.Generator, vox2world: np.ndarray, shape: tuple[int, int, int], field_t: float
) -> np.ndarray:
    """Relative flip angle (B1+). At 7 T the centre of the head gets too much, the temporal lobes
    and cerebellum too little (dielectric effect); at 3 T it is nearly flat."""
    centre_gain, base, wobble = (0.8, 0.8, 0.06) if field_t >= 7 else (0.12, 0.97, 0.03)
    centre = np.array([0.0, -18.0, 10.0]) + rng.normal(0.0, 5.0, 3)
    width = 70.0
    ax = [np.arange(n, dtype=np.float32) for n in shape]
    # |world - centre|^2 is a quadratic in ijk: build it from three 1-D axes to stay cheap
    lin, off = vox2world[:3, :3].astype(np.float32), (vox2world[:3, 3] - centre).astype(np.float32)
    r2 = np.zeros(shape, np.float32)
    for a in range(3):
        comp = (
            lin[a, 0] * ax[0][:, None, None]
            + lin[a, 1] * ax[1][None, :, None]
            + lin[a, 2] * ax[2][None, None, :]
            + off[a]
        )
        r2 += comp * comp
    bump = np.exp(-r2 / (2 * width**2))
    b1 = base * (1.0 + centre_gain * (bump - 0.5)) * np.exp(wobble * smooth_field(rng, vox2world, shape))
    return b1.astype(np.float32)


def receive_field(
    rng: np.random.Generator, vox2world: np.ndarray, shape: tuple[int, int, int], field_t: float
) -> np.ndarray:
    """Multiplicative receive bias (B1-): ~10% at 3 T, ~25% at 7 T (array coils)."""
    sd = 0.25 if field_t >= 7 else 0.10
    return np.exp(sd * smooth_field(rng, vox2world, shape)).astype(np.float32)


def add_noise(
    rng: np.random.Generator, signal: np.ndarray, sigma: float
) -> tuple[np.ndarray, np.ndarray]:
    """Complex Gaussian noise on a real signal: (real, imaginary) parts, float32.

    The magnitude ``hypot(real, imaginary)`` is Rician, as in a scanner. (The slowly varying
    background phase of real data is left out: it cancels in UNI and does not change magnitudes.)
    """
    real = rng.standard_normal(signal.shape, dtype=np.float32)
    real *= np.float32(sigma)
    real += signal
    imag = rng.standard_normal(signal.shape, dtype=np.float32)
    imag *= np.float32(sigma)
    return real, imag


def reference_wm_signal(field_t: float, sequence: str) -> float:
    """|signal| of white matter at nominal B1 in the reference image (INV2 or T1w)."""
    tables = signal_tables(field_t, sequence)
    nominal = int(np.argmin(np.abs(B1_GRID - 1.0)))
    return float(abs(tables[-1, CLASSES.index("wm"), nominal]))
