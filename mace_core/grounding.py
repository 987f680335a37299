"""Concept boxes with Grounding DINO: the detection half of Grounded-SAM (MACE Stage 2).

Grounding DINO scores every query box against every token of a caption. Following the
paper's setting (box threshold 0.3, text threshold 0.25), a box is kept when its best
token probability exceeds the box threshold AND at least one token of the concept itself
(not [CLS], [SEP] or the '.' delimiter) exceeds the text threshold: the text threshold is
what decides that a box belongs to the concept's phrase, as in Grounding DINO's own phrase
extraction. Models come from transformers (``GroundingDinoForObjectDetection`` and its
processor): a hub id, a local folder, or ``tiny`` for a built-in random model.
"""

from __future__ import annotations

import numpy as np
import torch

from mace_core.pretrained import TINY, load_model_and_processor

DEFAULT_DETECTOR = "IDEA-Research/grounding-dino-tiny"


def grounding_text(concept: str) -> str:
    """The caption Grounding DINO expects: lower case, single spaces, ending with '.'.

    The model was trained on lower-cased captions whose phrases end with '.', the
    delimiter its text masks are built from.
    """
    text = " ".join(concept.lower().split())
    return text if text.endswith(".") else text + "."


def select_boxes(
    logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    delimiter_ids: torch.Tensor,
    size: tuple[int, int],
    box_threshold: float,
    text_threshold: float,
) -> list[np.ndarray]:
    """Boxes of the concept per image, xyxy pixels of an (H, W) image, best score first.

    ``logits``: (B, Q, max_text_len) token logits per query; ``pred_boxes``: (B, Q, 4)
    normalised (cx, cy, w, h); ``input_ids`` / ``attention_mask``: (B, L) caption tokens.
    Comparisons are strict, as in Grounding DINO: a box threshold of 1.0 keeps nothing;
    both thresholds at 0.0 keep every box inside the image.
    """
    probs = logits.float().sigmoid()
    scores = probs.max(dim=-1).values  # (B, Q)
    # The model truncates captions longer than its max_text_len; so do the token masks.
    length = min(input_ids.shape[1], probs.shape[-1])
    ids = input_ids[:, :length]
    phrase = attention_mask[:, :length].bool() & ~torch.isin(ids, delimiter_ids.to(ids.device))
    grounded = ((probs[..., :length] > text_threshold) & phrase[:, None, :]).any(dim=-1)
    keep = (scores > box_threshold) & grounded
    h, w = size
    cx, cy, bw, bh = pred_boxes.float().unbind(-1)
    xyxy = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=-1)
    xyxy = xyxy.clamp(0.0, 1.0) * torch.tensor([w, h, w, h], dtype=xyxy.dtype, device=xyxy.device)
    # A box squeezed to nothing by clipping (outside the image) prompts SAM with nothing.
    keep &= (xyxy[..., 2] > xyxy[..., 0]) & (xyxy[..., 3] > xyxy[..., 1])
    out = []
    for i in range(xyxy.shape[0]):
        idx = keep[i].nonzero(as_tuple=True)[0]
        idx = idx[scores[i, idx].argsort(descending=True)]
        out.append(xyxy[i, idx].cpu().numpy().astype(np.float32))
    return out


def image_batch(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> one uint8 (N, 3, H, W) tensor, the input transformers' torchvision
    image processors resize fastest (the same pixels as a list of HWC arrays, in about a
    third of the time)."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)


class GroundingDino:
    """Grounding DINO boxes for a text in a batch of images (one forward pass per call)."""

    def __init__(
        self,
        model,  # GroundingDinoForObjectDetection
        processor,  # GroundingDinoProcessor
        device: torch.device,
        box_threshold: float = 0.3,
        text_threshold: float = 0.25,
    ) -> None:
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = device
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold
        tok = processor.tokenizer
        ids = set(tok.all_special_ids) | set(tok.convert_tokens_to_ids([".", "?"]))
        self.delimiter_ids = torch.tensor(sorted(ids), dtype=torch.long)

    @torch.no_grad()
    def detect(self, images: np.ndarray, text: str) -> list[np.ndarray]:
        """uint8 (N, H, W, 3) images -> per image a float32 (k, 4) xyxy array of boxes."""
        n, h, w = images.shape[:3]
        inputs = self.processor(
            images=image_batch(images),
            text=[grounding_text(text)] * n,
            return_tensors="pt",
        )
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        out = self.model(**inputs)
        return select_boxes(
            out.logits,
            out.pred_boxes,
            inputs["input_ids"],
            inputs["attention_mask"],
            self.delimiter_ids,
            (h, w),
            self.box_threshold,
            self.text_threshold,
        )


# ---------------------------------------------------------------- loading


def tiny_bert_vocab() -> dict[str, int]:
    """A small WordPiece vocabulary in BERT-uncased layout (about 1100 entries).

    transformers' Grounding DINO hard-codes the BERT-uncased ids of [CLS] (101), [SEP]
    (102), '.' (1012) and '?' (1029) to build its phrase masks, so those tokens sit at
    exactly those ids, as in BERT (ASCII punctuation and digits from id 999 on). Lower-case
    letters and digits, alone and as '##' continuations, spell any ASCII word.
    """
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [f"[unused{i}]" for i in range(99, 99 + 999 - len(vocab))]
    vocab += [chr(c) for c in range(33, 65)]  # '!' .. '@', with '.' at 1012 and '?' at 1029
    vocab += [chr(c) for c in range(91, 127)]  # '[' .. '~', lower-case letters included
    vocab += [f"##{c}" for c in "0123456789abcdefghijklmnopqrstuvwxyz"]
    return {t: i for i, t in enumerate(vocab)}


def build_tiny_grounding_dino(seed: int = 0):  # -> (GroundingDinoForObjectDetection, GroundingDinoProcessor)
    """A seeded random Grounding DINO (Swin + BERT, tiny widths) and its processor, offline.

    Images are resized to 64 px: its boxes are meaningless, its code path is the real one.
    """
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    vocab = tiny_bert_vocab()
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(
            image_size=64,
            embed_dim=8,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 1, 1],
            window_size=7,
            out_features=["stage2", "stage3", "stage4"],
            out_indices=[2, 3, 4],
        ),
        text_config=BertConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        ),
        d_model=32,
        num_queries=6,
        encoder_layers=1,
        decoder_layers=2,  # transformers needs >= 2
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_n_points=2,
        decoder_n_points=2,
        max_text_len=64,
        # The backbone's three levels only: a fourth, strided from the 2x2 one, would be 1x1,
        # and GroupNorm fails on a 1x1 map of a single image.
        num_feature_levels=3,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GroundingDinoForObjectDetection(config).eval()
    tokenizer = BertTokenizer(vocab=vocab, model_max_length=config.max_text_len)
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 64})
    return model, GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer)


def load_grounding_dino(
    spec: str, device: torch.device, box_threshold: float, text_threshold: float
) -> GroundingDino:
    """``tiny``, a hub id or a local folder; errors name ``spec``."""
    if spec == TINY:
        model, processor = build_tiny_grounding_dino()
        return GroundingDino(model, processor, device, box_threshold, text_threshold)

    from transformers import AutoProcessor, GroundingDinoForObjectDetection

    model, processor = load_model_and_processor(
        spec, "detector", "grounding-dino", "Grounding DINO", GroundingDinoForObjectDetection, AutoProcessor
    )
    return GroundingDino(model, processor, device, box_threshold, text_threshold)
