"""Drawing the window: the frame letterboxed into the window, the HUD, the prompt text box.

Only pixels: what the HUD says comes from `client.hud.HudModel` (plain code); this module puts it on
a pygame surface. Knows nothing about sockets or sessions.
"""

from __future__ import annotations

import numpy as np
import pygame

from client.hud import HudModel

HELP_LINE = "WASD/IJKL/arrows move  P pause  R reset  T prompt  Q quality  B branch  H HUD  F11 full"


def letterbox(frame_wh: tuple[int, int], window_wh: tuple[int, int]) -> pygame.Rect:
    """The largest rectangle of the frame's aspect centred in the window."""
    fw, fh = frame_wh
    ww, wh = window_wh
    scale = min(ww / fw, wh / fh)
    w, h = max(1, int(fw * scale)), max(1, int(fh * scale))
    return pygame.Rect((ww - w) // 2, (wh - h) // 2, w, h)


class FrameSurface:
    """The frame scaled to the window, rebuilt only when `key` (what it shows) changes."""

    def __init__(self) -> None:
        self.key = None
        self.surface: pygame.Surface | None = None
        self.rect = pygame.Rect(0, 0, 1, 1)

    def update(self, key, frame: np.ndarray, window_wh: tuple[int, int]) -> None:
        """`frame`: uint8 [H, W, 3]."""
        h, w = frame.shape[:2]
        surf = pygame.image.frombuffer(np.ascontiguousarray(frame).tobytes(), (w, h), "RGB")
        self.rect = letterbox((w, h), window_wh)
        self.surface = pygame.transform.scale(surf, self.rect.size)
        self.key = key

    def blit(self, screen: pygame.Surface) -> None:
        if self.surface is not None:
            screen.blit(self.surface, self.rect)


class Painter:
    """Text and HUD drawing on the window's surface."""

    def __init__(self) -> None:
        self.font = pygame.font.Font(None, 20)
        self.big_font = pygame.font.Font(None, 28)

    def text(self, screen, text: str, pos, color=(235, 235, 235), big: bool = False) -> int:
        """Shadowed text; returns its height."""
        font = self.big_font if big else self.font
        img = font.render(text, True, color)
        screen.blit(font.render(text, True, (0, 0, 0)), (pos[0] + 1, pos[1] + 1))
        screen.blit(img, pos)
        return img.get_height()

    @staticmethod
    def panel(screen, rect, alpha: int = 130) -> None:
        back = pygame.Surface(rect.size, pygame.SRCALPHA)
        back.fill((0, 0, 0, alpha))
        screen.blit(back, rect.topleft)

    def hud(self, screen, hud: HudModel, lines: list[str], prompt: str) -> None:
        """Stats top left, REC + session id top right, mini-map bottom right, prompt and keys bottom left."""
        sw, sh = screen.get_size()
        self.panel(screen, pygame.Rect(6, 6, min(sw, 560), 8 + 18 * len(lines)))
        y = 10
        for line in lines:
            y += self.text(screen, line, (12, y)) + 2
        label = hud.rec_label()
        if label:
            img = self.font.render(label, True, (255, 80, 80) if hud.recording else (220, 220, 220))
            x = sw - img.get_width() - 12
            self.panel(screen, pygame.Rect(x - 22, 6, img.get_width() + 30, img.get_height() + 8), 150)
            if hud.recording:
                pygame.draw.circle(screen, (230, 30, 30), (x - 10, 17), 6)
            screen.blit(img, (x, 10))
        self.panel(screen, pygame.Rect(6, sh - 50, min(sw, 640), 46))
        self.text(screen, HELP_LINE, (12, sh - 44), (190, 190, 190))
        self.text(screen, f"prompt: {prompt}"[:120], (12, sh - 24))
        self.minimap(screen, hud)

    def minimap(self, screen, hud: HudModel) -> None:
        sw, sh = screen.get_size()
        size = max(60, min(160, sw // 5, sh // 3))
        box = pygame.Rect(sw - size - 10, sh - size - 34, size, size)
        mm = pygame.Surface(box.size, pygame.SRCALPHA)
        mm.fill((0, 0, 0, 140))
        pts = hud.minimap(size, size)
        if len(pts) >= 2:
            pygame.draw.lines(mm, (90, 200, 255), False, pts, 2)
        if pts:
            x, y = pts[-1]
            hx, hz = hud.heading
            norm = max(1e-6, (hx * hx + hz * hz) ** 0.5)
            pygame.draw.line(mm, (255, 220, 60), (x, y), (x + 12 * hx / norm, y - 12 * hz / norm), 2)
            pygame.draw.circle(mm, (255, 220, 60), (x, y), 3)
        screen.blit(mm, box)
        self.text(screen, "path (top view)", (box.x, box.bottom + 2))

    def text_box(self, screen, typing: str) -> None:
        sw, sh = screen.get_size()
        box = pygame.Rect(20, sh // 2 - 24, sw - 40, 48)
        pygame.draw.rect(screen, (20, 20, 28), box)
        pygame.draw.rect(screen, (200, 200, 220), box, 2)
        self.text(screen, "new prompt (Enter: apply, Esc: cancel)", (box.x + 6, box.y - 20))
        self.text(screen, typing[-90:] + "_", (box.x + 8, box.y + 12), big=True)
