"""Offline OCR of generated images (Chinese and English) and the per-image text verdict.

The reader is ``rapidocr-onnxruntime``: PP-OCRv4 detection + recognition models (Chinese and English in one
recogniser) exported to ONNX and shipped inside the wheel (about 16 MB), run by onnxruntime on the CPU — nothing is
downloaded at run time, and it installs on Python 3.11/3.12. Alternatives considered: ``rapidocr`` 2.x/3.x (same
models, but fetches them on first use), EasyOCR and docTR (torch models downloaded from a hub at first use; docTR has
no Chinese), PaddleOCR (the PaddlePaddle framework and downloaded models), Tesseract (a system binary plus separate
``chi_sim`` data, and weak on rendered scene text), Surya (large downloaded models, GPU-oriented).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import QwenStudioError
from .expected import DEFAULT_MAX_CER, Expected, TextScore, extract_expected, score_reading


@dataclass(frozen=True)
class OcrLine:
    text: str
    confidence: float
    box: tuple[tuple[float, float], ...]  # four corners, pixels


class TextReader:
    """Lazily built OCR engine (building it takes ~0.3 s; reading an image well under a second on a CPU)."""

    def __init__(self) -> None:
        self._engine: Any = None

    def _ocr(self):
        if self._engine is None:
            try:
                from rapidocr_onnxruntime import RapidOCR
            except ImportError:
                raise QwenStudioError(
                    "text scoring needs the OCR package: pip install 'qwenstudio[compare]' (rapidocr-onnxruntime); "
                    "or pass --no-ocr", code="missing_dependency",
                ) from None
            self._engine = RapidOCR()
        return self._engine

    def read(self, image) -> list[OcrLine]:
        """Text lines of a PIL image, top to bottom, left to right."""
        result, _ = self._ocr()(image.convert("RGB"))  # a PIL image: the reader converts it to BGR itself
        return [OcrLine(str(text), float(conf), tuple((float(x), float(y)) for x, y in box))
                for box, text, conf in (result or [])]  # already in reading order (the reader sorts its boxes)

    def score(self, image, expected: Expected | str, max_cer: float = DEFAULT_MAX_CER) -> TextScore:
        """OCR ``image`` and score it against ``expected`` (an ``Expected`` or a prompt to extract it from)."""
        exp = extract_expected(expected) if isinstance(expected, str) else expected
        if not exp.strings:
            return TextScore((), "", max_cer, exp.notes)
        return score_reading(exp, [ln.text for ln in self.read(image)], max_cer)

