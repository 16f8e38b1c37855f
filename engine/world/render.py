"""Rendering world faces: a batch of (identity traits, nuisance) -> aligned VIS and NIR images.

Every part of a face is an implicit shape f(x, y) (negative inside, roughly a distance) evaluated on
the whole batch's pixel grids at once. A pixel's coverage is `0.5 - f / |grad f|`, clipped to [0, 1],
with the gradient taken per pixel: an analytic box-filter estimate that anti-aliases every edge at
any resolution without supersampling. Parts are painted back to front onto a four-channel albedo
(R, G, B, NIR reflectance); the two bands then get their own lighting (a free visible light, a
near-frontal NIR illuminator), so VIS and NIR share every pixel's geometry but not its values.
"""

from __future__ import annotations

import numpy as np

from facegen.engine.seeding import Stream, draw_keys, uniform
from facegen.engine.world.traits import HAIR, IRIS, SKIN, Identity, Nuisance, palette

EPS = np.float32(1e-6)
SENSOR_NOISE = (1.2 / 255, 2.0 / 255)  # VIS, NIR standard deviation (NIR sensors are noisier)


def cover(f: np.ndarray, soft: float = 1.0) -> np.ndarray:
    """Coverage of the shape f < 0 per pixel, [n, H, W] float32; `soft` widens the edge (pixels)."""
    gy, gx = np.gradient(f, axis=(1, 2))
    slope = np.maximum(np.hypot(gx, gy), EPS) * np.float32(soft)
    return np.clip(0.5 - f / slope, 0.0, 1.0)


def ellipse(x, y, cx, cy, rx, ry):
    """Approximate signed distance to an axis-aligned ellipse (exact on the axes)."""
    return (np.hypot((x - cx) / rx, (y - cy) / ry) - 1.0) * np.minimum(rx, ry)


def capsule(x, y, ax, ay, bx, by, radius):
    """Signed distance to the segment a-b thickened by `radius`."""
    dx, dy = bx - ax, by - ay
    t = np.clip(((x - ax) * dx + (y - ay) * dy) / (dx * dx + dy * dy + EPS), 0.0, 1.0)
    return np.hypot(x - ax - t * dx, y - ay - t * dy) - radius


def box(x, y, cx, cy, half_w, half_h, radius=0.0):
    """Signed distance to a rectangle with rounded corners."""
    qx, qy = np.abs(x - cx) - half_w + radius, np.abs(y - cy) - half_h + radius
    outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
    return outside + np.minimum(np.maximum(qx, qy), 0.0) - radius


def col(values: np.ndarray) -> np.ndarray:
    """[n] -> [n, 1, 1] for broadcasting over pixel grids."""
    return np.asarray(values, np.float32)[:, None, None]


def lattice_noise(keys: np.ndarray, x: np.ndarray, y: np.ndarray, cells: int, extent: float = 1.6) -> np.ndarray:
    """Smooth value noise in [-1, 1], sampled bilinearly at (x, y) from a per-key random lattice
    spanning [-extent, extent]: a texture that moves with the face it is painted on."""
    n = len(keys)
    grid = (uniform(keys, cells * cells).reshape(n, cells, cells) * 2 - 1).astype(np.float32)
    gx = np.clip((x + extent) / (2 * extent) * (cells - 1), 0, cells - 1.001)
    gy = np.clip((y + extent) / (2 * extent) * (cells - 1), 0, cells - 1.001)
    ix, iy = gx.astype(np.int64), gy.astype(np.int64)
    tx, ty = gx - ix, gy - iy
    tx, ty = tx * tx * (3 - 2 * tx), ty * ty * (3 - 2 * ty)  # smoothstep: no visible lattice creases
    b = np.arange(n)[:, None, None]
    top = grid[b, iy, ix] * (1 - tx) + grid[b, iy, ix + 1] * tx
    bottom = grid[b, iy + 1, ix] * (1 - tx) + grid[b, iy + 1, ix + 1] * tx
    return (top * (1 - ty) + bottom * ty).astype(np.float32)


class Canvas:
    """Four-channel albedo (R, G, B, NIR) painted back to front, and how much of each pixel is person."""

    def __init__(self, n: int, resolution: int):
        self.albedo = np.zeros((n, 4, resolution, resolution), np.float32)
        self.person = np.zeros((n, resolution, resolution), np.float32)

    def paint(self, coverage: np.ndarray, colour: np.ndarray, person: bool = True) -> None:
        """Alpha-blend `colour` ([n, 4] or [n, 4, H, W]) where `coverage` ([n, H, W]) says."""
        colour = colour[:, :, None, None] if colour.ndim == 2 else colour
        a = coverage[:, None]
        self.albedo += a * (colour - self.albedo)
        if person:
            self.person += coverage * (1 - self.person)

    def scale(self, coverage: np.ndarray, factor: np.ndarray) -> None:
        """Multiply the albedo by `factor` ([n, 4]) where `coverage` says (shadows, tints)."""
        self.albedo *= 1 + coverage[:, None] * (factor[:, :, None, None] - 1)


def face_frame(nuis: Nuisance, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in face coordinates, [n, R, R] each: the image grid, un-shifted, un-rotated, un-scaled."""
    u = (np.arange(resolution, dtype=np.float32) + 0.5) * (2.0 / resolution) - 1.0
    px, py = u[None, None, :], u[None, :, None]
    dx, dy = px - col(nuis.shift_x), py - col(nuis.shift_y) + 0.06  # the eyes sit a little above centre
    c, s = col(np.cos(nuis.roll)), col(np.sin(nuis.roll))
    return (c * dx + s * dy) / col(nuis.scale), (-s * dx + c * dy) / col(nuis.scale)


def render_faces(ident: Identity, nuis: Nuisance, resolution: int, seed: int, identities: np.ndarray,
                 samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """VIS uint8 [n, R, R, 3] and NIR uint8 [n, R, R] of n (identity, sample) pairs, pixel-aligned."""
    n = len(nuis)
    x, y = face_frame(nuis, resolution)
    canvas = Canvas(n, resolution)
    skin = palette(ident.skin, SKIN)
    hair = palette(ident.hair, HAIR)
    skin_keys = draw_keys(seed, Stream.WORLD_IDENTITY, identities, 1)  # identity-stable skin texture
    skin_tex = lattice_noise(skin_keys, x, y, 12)

    _background(canvas, nuis, resolution)
    fw, fh, jaw = col(ident.face_w), col(ident.face_h), col(ident.jaw)
    # Yaw and pitch: inner features slide in the direction of the turn, the nose tip furthest.
    turn_x, turn_y = col(nuis.yaw), col(nuis.pitch)
    face_cx = 0.25 * 0.12 * turn_x
    below = np.clip(y / fh, 0.0, 1.0)
    face_halfwidth = fw * (1 - jaw * below * below) * (1 - 0.08 * np.sign(x - face_cx) * turn_x)
    face = (np.hypot((x - face_cx) / face_halfwidth, y / fh) - 1.0) * fw

    long_hair = col(np.clip((ident.hair_len - 0.4) / 0.25, 0.0, 1.0))
    back_hair = _back_hair(canvas, ident, x, y, hair, skin_tex)
    _neck_and_clothes(canvas, ident, nuis, x, y, skin)
    _ears(canvas, ident, x, y, turn_x, skin, back_hair * long_hair)
    skin_map = skin[:, :, None, None] * (1 + 0.035 * skin_tex[:, None])
    canvas.paint(cover(face), skin_map)

    fx, fy = 0.12 * turn_x, 0.10 * turn_y  # feature offset
    _cheeks(canvas, ident, x - fx, y - fy, face)
    _beard(canvas, ident, x - fx, y - fy, face, hair, skin_tex)
    _eyes(canvas, ident, nuis, x - fx, y - fy, skin, seed)
    _brows(canvas, ident, nuis, x - fx, y - fy, hair)
    _nose(canvas, ident, nuis, x - fx, y - fy, turn_x, skin)
    _mouth(canvas, ident, nuis, x - fx, y - fy, skin)
    _mole(canvas, ident, x - fx, y - fy, skin)
    _glasses(canvas, ident, x - fx, y - fy)
    _front_hair(canvas, ident, x, y, face, hair, skin_tex)
    return _light(canvas, nuis, x, y, fw, fh, seed, identities, samples)


def _background(canvas: Canvas, nuis: Nuisance, resolution: int) -> None:
    u = (np.arange(resolution, dtype=np.float32) + 0.5) * (2.0 / resolution) - 1.0
    angle = nuis.background_angle
    along = col(np.cos(angle)) * u[None, None, :] + col(np.sin(angle)) * u[None, :, None]
    t = (0.5 + 0.35 * along)[:, None]
    first, second = nuis.background[:, 0, :, None, None], nuis.background[:, 1, :, None, None]
    colour = first * (1 - t) + second * t
    colour[:, 3] *= 0.45  # active NIR light falls off with distance: the background is dim
    canvas.paint(np.ones(canvas.person.shape, np.float32), colour, person=False)


def _back_hair(canvas: Canvas, ident: Identity, x, y, hair, texture) -> np.ndarray:
    fw, fh, vol = col(ident.face_w), col(ident.face_h), col(ident.hair_vol)
    cap = np.maximum(ellipse(x, y, 0.0, -0.04, fw + vol, fh + vol), y - 0.05)
    bottom = -0.05 + col(ident.hair_len) * (fh + 0.55)
    curtain = box(x, y, 0.0, (bottom - 0.1) / 2, fw + 0.8 * vol, (bottom + 0.1) / 2, 0.12)
    coverage = cover(np.minimum(cap, curtain))
    canvas.paint(coverage, _hair_map(hair, texture, 0.85))
    return coverage


def _hair_map(hair: np.ndarray, texture: np.ndarray, shade: float) -> np.ndarray:
    return hair[:, :, None, None] * (shade + 0.12 * texture[:, None])


def _neck_and_clothes(canvas: Canvas, ident: Identity, nuis: Nuisance, x, y, skin) -> None:
    fh, nw = col(ident.face_h), col(ident.neck_w)
    neck = box(x, y, 0.0, fh + 0.35, nw, 0.6, 0.05)
    canvas.paint(cover(neck), skin * np.array([0.8, 0.8, 0.8, 0.9], np.float32))  # under the chin: shadow
    body = ellipse(x, y, 0.0, fh + 0.72, col(ident.face_w) * 2.4, 0.45 + 0 * fh)
    collar = ellipse(x, y, 0.0, fh + 0.28, nw * 1.15, 0.14 + 0 * fh)
    canvas.paint(cover(np.maximum(body, -collar)), nuis.clothes)


def _ears(canvas: Canvas, ident: Identity, x, y, turn_x, skin, hidden) -> None:
    fw, size = col(ident.face_w), col(ident.ear)
    ey = col(ident.eye_y) + 0.06
    for side in (-1.0, 1.0):
        # Turning towards one side shows more of the other ear.
        cx = side * (fw * (0.97 - 0.1 * side * turn_x))
        ear = ellipse(x, y, cx, ey, 0.05 * size, 0.1 * size)
        coverage = cover(ear) * (1 - hidden)
        canvas.paint(coverage, skin * np.array([0.93, 0.88, 0.88, 0.97], np.float32))
        inner = ellipse(x, y, cx + side * 0.008, ey, 0.024 * size, 0.06 * size)
        canvas.scale(cover(inner, 2.0) * coverage, np.array([[0.78, 0.72, 0.72, 0.9]], np.float32).repeat(len(fw), 0))


def _cheeks(canvas: Canvas, ident: Identity, x, y, face) -> None:
    """Blush is haemoglobin: visible band only."""
    inside = cover(face)
    for side in (-1.0, 1.0):
        cheek = ellipse(x, y, side * col(ident.eye_sep) * 1.1, col(ident.eye_y) + 0.17, 0.09, 0.06)
        amount = np.clip(0.5 - cheek / 0.06, 0, 1) * inside
        factor = np.stack([1 + 0 * ident.blush, 1 - ident.blush, 1 - 1.2 * ident.blush, 1 + 0 * ident.blush], 1)
        canvas.scale(amount, factor)


def _beard(canvas: Canvas, ident: Identity, x, y, face, hair, texture) -> None:
    fw, my = col(ident.face_w), col(ident.mouth_y)
    line = (my - 0.06 - 0.3 * (x / fw) ** 2) - y  # moustache line, rising to sideburns
    coverage = cover(np.maximum(face + 0.004, line), 2.0) * col(0.8 * ident.beard)
    canvas.paint(coverage, _hair_map(hair, texture, 0.9))


def _eyes(canvas: Canvas, ident: Identity, nuis: Nuisance, x, y, skin, seed: int) -> None:
    n = len(nuis)
    w = col(ident.eye_w)
    height = col(ident.eye_open * nuis.eye_open) * w
    up, down = np.maximum(0.62 * height, 0.004), np.maximum(0.38 * height, 0.003)
    iris_rgbn = palette(ident.iris, IRIS)
    sclera = np.array([[0.93, 0.91, 0.88, 0.85]], np.float32).repeat(n, 0)
    for side in (-1.0, 1.0):
        ex, ey = x - side * col(ident.eye_sep), y - col(ident.eye_y)
        socket = ellipse(ex, ey, 0.0, -0.01, w * 1.45, w * 0.95)
        canvas.scale(np.clip(0.5 - socket / 0.05, 0, 1), skin * 0 + np.array([0.88, 0.86, 0.86, 0.95], np.float32))
        # Almond: the intersection of the discs through both corners and the top (bottom) of the lid.
        r_up, r_down = (w * w + up * up) / (2 * up), (w * w + down * down) / (2 * down)
        upper = np.hypot(ex, ey - (r_up - up)) - r_up
        lower = np.hypot(ex, ey - (down - r_down)) - r_down
        eye = cover(np.maximum(upper, lower))
        canvas.paint(eye, sclera)
        ix, iy = col(nuis.gaze_x) * w * 0.45, col(nuis.gaze_y) * height * 0.3
        radius = 0.5 * w
        canvas.paint(cover(np.hypot(ex - ix, ey - iy) - radius) * eye, iris_rgbn)
        canvas.paint(cover(np.hypot(ex - ix, ey - iy) - 0.42 * radius) * eye,
                     np.array([[0.03, 0.03, 0.03, 0.04]], np.float32).repeat(n, 0))
        glint = np.hypot(ex - ix + 0.3 * radius * col(nuis.light_x), ey - iy + 0.3 * radius) - 0.16 * radius
        canvas.paint(cover(glint) * eye, np.array([[0.97, 0.97, 0.97, 0.97]], np.float32).repeat(n, 0))
        lash = np.maximum(np.abs(upper) - 0.006, np.maximum(np.abs(ex) - w * 1.05, ey - 0.004))
        canvas.paint(cover(lash), np.array([[0.12, 0.09, 0.08, 0.25]], np.float32).repeat(n, 0))


def _brows(canvas: Canvas, ident: Identity, nuis: Nuisance, x, y, hair) -> None:
    w = col(ident.eye_w)
    length = col(ident.brow_len) * w
    base = col(ident.eye_y) - 0.62 * col(ident.eye_open) * w - col(ident.brow_gap) - col(nuis.brow_raise)
    colour = hair * np.array([0.8, 0.8, 0.8, 0.75], np.float32)
    for side in (-1.0, 1.0):
        t = (x - side * col(ident.eye_sep)) * side / length  # -1 inner end .. 1 outer end
        curve = base - col(ident.brow_arch) * (1 - t * t) - col(ident.brow_tilt) * t
        thick = col(ident.brow_thick) * (1 - 0.3 * (t + 1) / 2)
        brow = np.maximum(np.abs(y - curve) - thick / 2, (np.abs(t - 0.05) - 1) * length)
        canvas.paint(cover(brow), colour)


def _nose(canvas: Canvas, ident: Identity, nuis: Nuisance, x, y, turn_x, skin) -> None:
    n = len(nuis)
    nw, tip_y = col(ident.nose_w), col(ident.eye_y) + col(ident.nose_len)
    tip_x = 0.08 * turn_x
    away = np.where(nuis.light_x >= 0, -1.0, 1.0).astype(np.float32)[:, None, None]
    lateral = col(np.abs(nuis.light_x))
    side = capsule(x, y, away * nw * 0.35, col(ident.eye_y) + 0.05, tip_x + away * nw * 0.9, tip_y - 0.02, 0.012)
    shadow = np.clip(0.5 - side / 0.03, 0, 1) * (0.4 + lateral)
    canvas.scale(shadow, np.array([[0.86, 0.84, 0.84, 0.92]], np.float32).repeat(n, 0))
    under = ellipse(x, y, tip_x, tip_y + 0.022, nw * 1.1, 0.018 + 0 * nw)
    canvas.scale(np.clip(0.5 - under / 0.03, 0, 1), np.array([[0.85, 0.83, 0.83, 0.92]], np.float32).repeat(n, 0))
    tip = ellipse(x, y, tip_x, tip_y - 0.018, nw * 0.8, 0.03 + 0 * nw)
    canvas.scale(np.clip(0.5 - tip / 0.03, 0, 1), np.array([[1.06, 1.06, 1.06, 1.03]], np.float32).repeat(n, 0))
    for sign in (-1.0, 1.0):
        nostril = ellipse(x, y, tip_x + sign * nw * 0.55, tip_y, nw * 0.36, nw * 0.2)
        canvas.paint(cover(nostril, 1.5), skin * np.array([0.42, 0.36, 0.36, 0.55], np.float32))


def _mouth(canvas: Canvas, ident: Identity, nuis: Nuisance, x, y, skin) -> None:
    n = len(nuis)
    mw, my = col(ident.mouth_w), col(ident.mouth_y)
    t = x / mw
    envelope = np.sqrt(np.clip(1 - t * t, 0, 1))
    smile, gape = col(nuis.smile), col(nuis.mouth_open)
    centre = my + 0.012 * smile - 0.04 * smile * t * t  # corners rise with a smile
    opening = 0.035 * gape * envelope
    lip = col(ident.lip) * (0.6 + 0.4 * envelope)
    lips_f = np.maximum(np.abs(y - centre - 0.15 * lip) - (opening + lip), np.abs(x) - mw)
    lip_colour = skin * np.array([0.9, 0.62, 0.6, 0.96], np.float32) * (1 - 0.15 * col(ident.lip_red)[:, :, 0])
    lip_colour[:, 1:3] *= (1 - 0.25 * ident.lip_red)[:, None]
    canvas.paint(cover(lips_f), lip_colour)
    inside = np.maximum(np.abs(y - centre) - opening, np.abs(x) - 0.88 * mw)
    canvas.paint(cover(inside), np.array([[0.22, 0.07, 0.07, 0.18]], np.float32).repeat(n, 0))
    teeth = np.maximum(inside, y - (centre - 0.35 * opening))
    canvas.paint(cover(teeth), np.array([[0.9, 0.88, 0.82, 0.82]], np.float32).repeat(n, 0))
    line = np.maximum(np.abs(y - centre) - 0.004, np.abs(x) - 0.95 * mw)
    canvas.paint(cover(line) * 0.7, skin * np.array([0.35, 0.25, 0.25, 0.6], np.float32))


def _mole(canvas: Canvas, ident: Identity, x, y, skin) -> None:
    mark = np.hypot(x - col(ident.mole_x), y - col(ident.mole_y)) - 0.014
    canvas.paint(cover(mark) * col(ident.mole), skin * np.array([0.45, 0.35, 0.3, 0.7], np.float32))


def _glasses(canvas: Canvas, ident: Identity, x, y) -> None:
    """Frames only (clear lenses): thin rounded rectangles around the eyes and a bridge."""
    n = len(ident)
    w, ey, sep = col(ident.eye_w), col(ident.eye_y), col(ident.eye_sep)
    frames = None
    for side in (-1.0, 1.0):
        rim = np.abs(box(x, y, side * sep, ey + 0.005, w * 1.55, w * 1.05, 0.03)) - 0.008
        frames = rim if frames is None else np.minimum(frames, rim)
    bridge = capsule(x, y, -sep + w * 1.55, ey - 0.01, sep - w * 1.55, ey - 0.01, 0.007)
    colour = np.array([[0.08, 0.07, 0.07, 0.12]], np.float32).repeat(n, 0)
    canvas.paint(cover(np.minimum(frames, bridge)) * col(ident.glasses), colour)


def _front_hair(canvas: Canvas, ident: Identity, x, y, face, hair, texture) -> None:
    fw, fh, vol = col(ident.face_w), col(ident.face_h), col(ident.hair_vol)
    brow_y = col(ident.eye_y) - col(ident.eye_w) * 0.7 - col(ident.brow_gap)
    top = -fh * 0.92
    middle = top + (brow_y - 0.05 - top) * col(ident.hairline)  # the hairline above the forehead centre
    temple = col(ident.eye_y) - 0.02  # hair meets the face at the temples
    bend = (temple - middle) / (fw * fw)
    dx = x - col(ident.parting)
    # An arch from the parting down to the temples; above the eyes it stops short of the brows.
    beside_eyes = np.clip((np.abs(x) - col(ident.eye_sep) - col(ident.eye_w)) / 0.08, 0.0, 1.0)
    lowest = brow_y - 0.03 + (temple - brow_y + 0.03) * beside_eyes * beside_eyes * (3 - 2 * beside_eyes)
    hairline = (y - np.minimum(middle + bend * dx * dx, lowest)) / np.sqrt(1 + (2 * bend * dx) ** 2)
    cap = ellipse(x, y, 0.0, -0.04, fw + vol, fh + vol)
    canvas.paint(cover(np.maximum(cap, hairline)), _hair_map(hair, texture, 1.0))


def _light(canvas: Canvas, nuis: Nuisance, x, y, fw, fh, seed: int, identities: np.ndarray,
           samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lambertian shading of a head-sized ellipsoid, per band; then sensor noise and 8-bit output."""
    nx, ny = x / (fw * 1.15), (y + 0.02) / (fh * 1.1)
    r2 = nx * nx + ny * ny
    outside = np.sqrt(np.maximum(r2, 1.0))  # past the ellipsoid's rim the normal turns sideways
    nx, ny = nx / outside, ny / outside
    nz = np.sqrt(np.clip(1 - nx * nx - ny * ny, 0, 1))
    diffuse = np.clip(nx * col(nuis.light_x) + ny * col(nuis.light_y) + nz * col(nuis.light_z), 0, 1)
    ambient = col(nuis.ambient)
    vis_shade = col(nuis.exposure) * (ambient + (1 - ambient) * 1.1 * diffuse)
    nir_dir = np.stack([nuis.nir_light_x, nuis.nir_light_y, np.ones_like(nuis.nir_light_x)])
    nir_dir /= np.linalg.norm(nir_dir, axis=0)
    nir_diffuse = np.clip(nx * col(nir_dir[0]) + ny * col(nir_dir[1]) + nz * col(nir_dir[2]), 0, 1)
    nir_shade = col(nuis.nir_gain) * (0.45 + 0.6 * nir_diffuse)
    person = canvas.person
    vis_shade = person * vis_shade + (1 - person) * col(nuis.exposure)
    nir_shade = person * nir_shade + (1 - person) * col(nuis.nir_gain)
    tint = np.stack([1 + nuis.warmth, np.ones_like(nuis.warmth), 1 - nuis.warmth], 1)[:, :, None, None]
    vis = canvas.albedo[:, :3] * vis_shade[:, None] * tint
    nir = canvas.albedo[:, 3] * nir_shade
    # Sensor noise: one independent draw per pixel and band, keyed by (identity, sample).
    keys = draw_keys(seed, Stream.WORLD_SAMPLE, identities, samples * 2 + 1 + (1 << 32))
    r = vis.shape[-1]
    noise = (uniform(keys, 4 * r * r).reshape(-1, 4, r, r).astype(np.float32) - 0.5) * np.float32(np.sqrt(12))
    vis = vis + noise[:, :3] * SENSOR_NOISE[0]
    nir = nir + noise[:, 3] * SENSOR_NOISE[1]
    to8 = lambda a: np.clip(np.rint(a * 255), 0, 255).astype(np.uint8)  # noqa: E731
    return to8(vis.transpose(0, 2, 3, 1)), to8(nir)
