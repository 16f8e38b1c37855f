"""What a world face is made of: identity traits (fixed per person) and nuisance (new every sample).

Every value is a pure function of (world seed, identity) or (world seed, identity, sample), drawn with
the engine's counter-based hash (`engine.seeding`), so a face never depends on which batch rendered
it, and a rerun is identical on every machine. Lengths are in face units: the image spans [-1, 1],
y points down, the face centre sits near the origin.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from facegen.engine.seeding import Stream, draw_keys, uniform


def _lerp(u: np.ndarray, low: float, high: float) -> np.ndarray:
    return (low + (high - low) * u).astype(np.float32)


def palette(u: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """Piecewise-linear colour ramp: u in [0, 1] -> row of `stops` interpolated, float32 [n, C]."""
    position = np.clip(u, 0.0, 1.0) * (len(stops) - 1)
    low = np.minimum(position.astype(np.int64), len(stops) - 2)
    t = (position - low)[:, None]
    return (stops[low] * (1 - t) + stops[low + 1] * t).astype(np.float32)


# Colour ramps as (R, G, B, NIR) reflectance. NIR at ~850 nm: melanin absorbs far less than in the
# visible band, so dark skin, dark hair and brown irises all look much lighter than their visible
# luminance, and haemoglobin's low absorption leaves lips close to the surrounding skin.
SKIN = np.array([[0.97, 0.83, 0.72, 0.80], [0.90, 0.70, 0.56, 0.78], [0.76, 0.54, 0.38, 0.74],
                 [0.55, 0.37, 0.25, 0.69], [0.36, 0.23, 0.15, 0.62]], np.float32)
HAIR = np.array([[0.07, 0.06, 0.06, 0.30], [0.20, 0.13, 0.09, 0.38], [0.38, 0.25, 0.15, 0.46],
                 [0.55, 0.27, 0.12, 0.52], [0.80, 0.66, 0.42, 0.66], [0.72, 0.71, 0.70, 0.72]], np.float32)
IRIS = np.array([[0.22, 0.13, 0.07, 0.42], [0.40, 0.26, 0.12, 0.45], [0.45, 0.45, 0.22, 0.48],
                 [0.30, 0.48, 0.35, 0.50], [0.30, 0.45, 0.70, 0.52], [0.55, 0.60, 0.65, 0.55]], np.float32)


@dataclass
class Identity:
    """Per-person traits, one float32 array of length n each."""

    face_w: np.ndarray      # half-width of the face
    face_h: np.ndarray      # half-height of the face
    jaw: np.ndarray         # how much the lower face narrows (0 round, 0.35 pointed chin)
    skin: np.ndarray        # 0 light .. 1 dark (position on SKIN)
    blush: np.ndarray       # red tint of the cheeks
    eye_sep: np.ndarray     # half distance between the eye centres
    eye_y: np.ndarray       # eye line, relative to the face centre
    eye_w: np.ndarray       # half-width of an eye
    eye_open: np.ndarray    # eye height / width
    iris: np.ndarray        # position on IRIS
    brow_thick: np.ndarray
    brow_gap: np.ndarray    # brow height above the eye
    brow_arch: np.ndarray
    brow_tilt: np.ndarray   # outer end up (>0) or down
    brow_len: np.ndarray    # half-length, in eye widths
    nose_len: np.ndarray    # eye line to nostrils
    nose_w: np.ndarray
    mouth_y: np.ndarray     # mouth line, relative to the face centre
    mouth_w: np.ndarray     # half-width of the mouth
    lip: np.ndarray         # lip thickness
    lip_red: np.ndarray
    hair: np.ndarray        # position on HAIR
    hair_len: np.ndarray    # 0 cropped .. 1 shoulder length
    hair_vol: np.ndarray    # how far the hair stands off the head
    hairline: np.ndarray    # 0 high forehead .. 1 low fringe
    parting: np.ndarray     # horizontal position of the parting
    beard: np.ndarray       # 0 none, up to 1 full
    ear: np.ndarray         # ear size
    neck_w: np.ndarray
    glasses: np.ndarray     # 0 none, 1 glasses; frame darkness otherwise
    mole: np.ndarray        # 0 none, else a small dark mark at (mole_x, mole_y)
    mole_x: np.ndarray
    mole_y: np.ndarray

    def __len__(self) -> int:
        return len(self.face_w)

    def take(self, index: np.ndarray) -> Identity:
        return Identity(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


@dataclass
class Nuisance:
    """Per-sample pose, expression, lighting and background, one float32 array of length n each."""

    roll: np.ndarray        # in-plane rotation, radians
    shift_x: np.ndarray
    shift_y: np.ndarray
    scale: np.ndarray
    yaw: np.ndarray         # turning left/right: inner features slide sideways, one cheek narrows
    pitch: np.ndarray       # nodding: inner features slide up/down
    smile: np.ndarray       # -0.3 frown .. 1 broad smile
    mouth_open: np.ndarray  # 0 closed .. 1 open
    brow_raise: np.ndarray
    eye_open: np.ndarray    # multiplies the identity's eye opening
    gaze_x: np.ndarray
    gaze_y: np.ndarray
    light_x: np.ndarray     # visible light direction (unit vector with light_z)
    light_y: np.ndarray
    light_z: np.ndarray
    ambient: np.ndarray
    warmth: np.ndarray      # colour temperature of the visible light
    exposure: np.ndarray
    nir_light_x: np.ndarray  # the NIR illuminator sits near the camera: mostly frontal
    nir_light_y: np.ndarray
    nir_gain: np.ndarray
    background: np.ndarray   # [n, 2, 4]: two (R, G, B, NIR) colours of a background gradient
    background_angle: np.ndarray
    clothes: np.ndarray      # [n, 4]

    def __len__(self) -> int:
        return len(self.roll)


IDENTITY_DRAWS = len(fields(Identity))
NUISANCE_DRAWS = 40  # more than used: a new nuisance takes a fresh column, old ones keep theirs


def identity_traits(seed: int, identities: np.ndarray) -> Identity:
    """Traits of world identities (non-negative integers) under a world seed."""
    u = uniform(draw_keys(seed, Stream.WORLD_IDENTITY, np.asarray(identities, np.int64)), IDENTITY_DRAWS)
    col = iter(u.T)
    face_w = _lerp(next(col), 0.36, 0.47)
    return Identity(
        face_w=face_w,
        face_h=_lerp(next(col), 0.50, 0.60),
        jaw=_lerp(next(col), 0.0, 0.38),
        skin=_lerp(next(col), 0.0, 1.0),
        blush=_lerp(next(col), 0.0, 0.12),
        eye_sep=(face_w * _lerp(next(col), 0.37, 0.48)).astype(np.float32),
        eye_y=_lerp(next(col), -0.10, -0.02),
        eye_w=_lerp(next(col), 0.060, 0.085),
        eye_open=_lerp(next(col), 0.38, 0.62),
        iris=_lerp(next(col), 0.0, 1.0),
        brow_thick=_lerp(next(col), 0.016, 0.040),
        brow_gap=_lerp(next(col), 0.035, 0.075),
        brow_arch=_lerp(next(col), 0.0, 0.035),
        brow_tilt=_lerp(next(col), -0.025, 0.025),
        brow_len=_lerp(next(col), 1.1, 1.5),
        nose_len=_lerp(next(col), 0.14, 0.22),
        nose_w=_lerp(next(col), 0.035, 0.065),
        mouth_y=_lerp(next(col), 0.27, 0.35),
        mouth_w=_lerp(next(col), 0.10, 0.16),
        lip=_lerp(next(col), 0.014, 0.032),
        lip_red=_lerp(next(col), 0.2, 1.0),
        hair=_lerp(next(col), 0.0, 1.0) ** 1.6,  # dark hair is the most common
        hair_len=_lerp(next(col), 0.0, 1.0),
        hair_vol=_lerp(next(col), 0.02, 0.11),
        hairline=_lerp(next(col), 0.0, 1.0),
        parting=_lerp(next(col), -0.18, 0.18),
        beard=np.clip((next(col) - 0.78) / 0.12, 0.0, 1.0).astype(np.float32),
        ear=_lerp(next(col), 0.85, 1.15),
        neck_w=(face_w * _lerp(next(col), 0.52, 0.66)).astype(np.float32),
        glasses=(next(col) > 0.8).astype(np.float32),
        mole=(next(col) > 0.55).astype(np.float32),
        mole_x=_lerp(next(col), -0.3, 0.3),
        mole_y=_lerp(next(col), 0.0, 0.3),
    )


def nuisance(seed: int, identities: np.ndarray, samples: np.ndarray) -> Nuisance:
    """Per-sample nuisance of (identity, sample) pairs (arrays of equal length)."""
    keys = draw_keys(seed, Stream.WORLD_SAMPLE, np.asarray(identities, np.int64), np.asarray(samples, np.int64))
    u = uniform(keys, NUISANCE_DRAWS)
    col = iter(u.T)
    n = len(keys)
    # Visible light: anywhere in a cone of ~60 degrees around the camera axis.
    azimuth, tilt = 2 * np.pi * next(col), np.arccos(1 - 0.5 * next(col))
    light = np.stack([np.sin(tilt) * np.cos(azimuth), np.sin(tilt) * np.sin(azimuth) - 0.2, np.cos(tilt)])
    light = (light / np.linalg.norm(light, axis=0)).astype(np.float32)
    background = np.stack([_lerp(next(col), 0.15, 0.95) for _ in range(8)], axis=1).reshape(n, 2, 4)
    clothes = np.stack([_lerp(next(col), 0.05, 0.85) for _ in range(4)], axis=1)
    blink = next(col) < 0.06
    return Nuisance(
        roll=_lerp(next(col), -0.17, 0.17),
        shift_x=_lerp(next(col), -0.05, 0.05),
        shift_y=_lerp(next(col), -0.04, 0.05),
        scale=_lerp(next(col), 1.32, 1.48),
        yaw=_lerp(next(col), -0.30, 0.30),
        pitch=_lerp(next(col), -0.15, 0.15),
        smile=_lerp(next(col), -0.3, 1.0),
        mouth_open=np.clip(_lerp(next(col), -0.8, 1.0), 0.0, 1.0),
        brow_raise=_lerp(next(col), -0.012, 0.025),
        eye_open=np.where(blink, 0.12, _lerp(next(col), 0.8, 1.15)).astype(np.float32),
        gaze_x=_lerp(next(col), -0.35, 0.35),
        gaze_y=_lerp(next(col), -0.2, 0.2),
        light_x=light[0], light_y=light[1], light_z=light[2],
        ambient=_lerp(next(col), 0.45, 0.7),
        warmth=_lerp(next(col), -0.08, 0.08),
        exposure=_lerp(next(col), 0.85, 1.12),
        nir_light_x=_lerp(next(col), -0.25, 0.25),
        nir_light_y=_lerp(next(col), -0.25, 0.1),
        nir_gain=_lerp(next(col), 0.85, 1.1),
        background=background,
        background_angle=_lerp(next(col), 0.0, 2 * np.pi),
        clothes=clothes,
    )
