"""Wan pipelines generate the same latents and frames with a wrapped diffcaps model as with diffusers'."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import PIL.Image
import torch
from diffusers import WanImageToVideoPipeline, WanPipeline

from diffcaps.interop.diffusers import wrap
from diffcaps.models.wan import WanTransformer3DModel
from tests.interop.pipelines import WAN_CALL, assert_same, generate


def test_wan_text_to_video(wan_folder: Path) -> None:
    theirs = WanPipeline.from_pretrained(wan_folder)
    mine = WanPipeline.from_pretrained(
        wan_folder, transformer=wrap(WanTransformer3DModel.from_pretrained(wan_folder / "transformer")))
    call = {"prompt": ["a photo of a cat", "a red house"], "negative_prompt": "a blue sky", **WAN_CALL}
    assert_same(generate(mine, **call), generate(theirs, **call))


def test_wan_image_to_video(wan_i2v_folder: Path) -> None:
    theirs = WanImageToVideoPipeline.from_pretrained(wan_i2v_folder)
    mine = WanImageToVideoPipeline.from_pipe(
        theirs, transformer=wrap(WanTransformer3DModel.from_pretrained(wan_i2v_folder / "transformer")))
    # The image-to-video pipeline cleans prompts with ftfy, which diffusers does not install:
    # the text-to-video pipeline over the same tokenizer and encoder gives the embeddings
    text = WanPipeline(tokenizer=theirs.tokenizer, text_encoder=theirs.text_encoder, vae=theirs.vae,
                       scheduler=theirs.scheduler, transformer=None)
    positive, negative = text.encode_prompt("a photo of a cat", "a blue sky", max_sequence_length=512)
    image = PIL.Image.new("RGB", (32, 32), (200, 30, 40))
    call: dict[str, Any] = {"prompt_embeds": positive, "negative_prompt_embeds": negative, **WAN_CALL}
    assert_same(generate(mine, image, **call), generate(theirs, image, **call))


def test_wan_loaded_in_bfloat16_is_equal(wan_folder: Path) -> None:
    # both keep Wan's norms, time embedder and modulation tables in float32 when loading
    theirs = WanPipeline.from_pretrained(wan_folder, torch_dtype=torch.bfloat16)
    model = WanTransformer3DModel.from_pretrained(wan_folder / "transformer", torch_dtype=torch.bfloat16)
    assert model.scale_shift_table.dtype == torch.float32
    mine = WanPipeline.from_pretrained(wan_folder, transformer=wrap(model), torch_dtype=torch.bfloat16)
    assert model.scale_shift_table.dtype == torch.float32  # a passed component is not cast
    call = {"prompt": "a photo of a cat", "negative_prompt": "a dog", **WAN_CALL}
    assert_same(generate(mine, **call), generate(theirs, **call), tolerance=0.0)
