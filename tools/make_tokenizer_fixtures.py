#!/usr/bin/env python3
"""Fixtures for hdb's CLIP tokenizer (src/model/tokenizer.rs, tests/tokenizer.rs).

Run with the pinned reference venv (transformers 5.24, tokenizers, open-clip-torch, ftfy):

    /tmp/hdb-ref-venv/bin/python tools/make_tokenizer_fixtures.py            # fixtures
    /tmp/hdb-ref-venv/bin/python tools/make_tokenizer_fixtures.py --nfc-tables   # Rust NFC tables
    /tmp/hdb-ref-venv/bin/python tools/make_tokenizer_fixtures.py --sweep /tmp/sweep.json
        # every code point, for `HDB_TOKENIZER_SWEEP=/tmp/sweep.json cargo test --test tokenizer`

The reference is what diffusers' StableDiffusionPipeline runs: `transformers.CLIPTokenizer`, which in
transformers 5 is the `tokenizers`-backed class (there is no slow Python CLIPTokenizer any more, and
ftfy is not used by it even when installed). The SD 1.x tokenizer folder (openai/clip-vit-large-patch14's
vocab.json + merges.txt) is rebuilt from open_clip's bpe_simple_vocab_16e6.txt.gz exactly as OpenAI's
CLIP SimpleTokenizer builds its vocabulary, with SD 1.5's tokenizer_config.json/special_tokens_map.json,
and loaded with `CLIPTokenizer.from_pretrained` as diffusers does.

Writes data/clip/bpe_simple_vocab_16e6.txt.gz (copied from open_clip: the merge list hdb embeds as its
built-in SD 1.x tokenizer, src/model/tokenizer/builtin.rs) and under tests/fixtures/tokenizer/:
  prompts.json                  SD 1.5 prompts and their ids: `ids` unpadded, `pads` pad ids after them
                                make the pipeline's input_ids (checked against transformers' padding)
  configs.json                  tokenizer_config/special_tokens_map/tokenizer.json variants: which
                                special tokens match case-insensitively, the pad token, model_max_length
  tiny-sd.json                  ids of tests/fixtures/tiny-sd/tokenizer for a few prompts
"""

import argparse
import gzip
import json
import os
import random
import shutil
import sys
import tempfile
import unicodedata

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "tests", "fixtures", "tokenizer")
TINY = os.path.join(REPO, "tests", "fixtures", "tiny-sd", "tokenizer")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
N_MERGES = 49152 - 256 - 2  # what CLIP (and openai/clip-vit-large-patch14) keeps of the merge list


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_vocab(gz_path):
    """vocab.json and merges of openai/clip-vit-large-patch14, from the gz as CLIP's SimpleTokenizer reads it."""
    lines = gzip.open(gz_path).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : N_MERGES + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += [BOS, EOS]
    enc = {v: i for i, v in enumerate(vocab)}
    assert len(enc) == 49408, len(enc)
    return enc, merges


def added(content, normalized, typed=True):
    d = {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False}
    return {"__type": "AddedToken", **d} if typed else d


# runwayml/stable-diffusion-v1-5 tokenizer/ (and openai/clip-vit-large-patch14 without its tokenizer.json).
SD15_CONFIG = {
    "add_prefix_space": False,
    "bos_token": added(BOS, True),
    "do_lower_case": True,
    "eos_token": added(EOS, True),
    "errors": "replace",
    "model_max_length": 77,
    "name_or_path": "openai/clip-vit-large-patch14",
    "pad_token": EOS,
    "special_tokens_map_file": "./special_tokens_map.json",
    "tokenizer_class": "CLIPTokenizer",
    "unk_token": added(EOS, True),
}
SD15_SPECIAL_TOKENS_MAP = {
    "bos_token": added(BOS, True, False),
    "eos_token": added(EOS, True, False),
    "pad_token": EOS,
    "unk_token": added(EOS, True, False),
}


def write_folder(d, enc, merges, config=None, stm=None, tokenizer_json_added=None):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(enc, f, ensure_ascii=False)
    with open(os.path.join(d, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for m in merges:
            f.write(" ".join(m) + "\n")
    if config is not None:
        with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
            json.dump(config, f, indent=2)
    if stm is not None:
        with open(os.path.join(d, "special_tokens_map.json"), "w") as f:
            json.dump(stm, f, indent=2)
    if tokenizer_json_added is not None:
        from transformers import CLIPTokenizer

        full = json.loads(CLIPTokenizer(vocab=enc, merges=merges).backend_tokenizer.to_str())
        full["added_tokens"] = tokenizer_json_added
        with open(os.path.join(d, "tokenizer.json"), "w", encoding="utf-8") as f:
            json.dump(full, f, ensure_ascii=False)


def pipeline_ids(tok, prompt):
    """What StableDiffusionPipeline.encode_prompt feeds the text encoder, and the same unpadded."""
    padded = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    unpadded = tok(prompt, max_length=tok.model_max_length, truncation=True).input_ids
    # The fixtures store `ids` and the number of pad ids after them; this is what makes that exact.
    assert padded == unpadded + [tok.pad_token_id] * (tok.model_max_length - len(unpadded)), prompt
    return padded, unpadded


# ------------------------------------------------------------------------------------------------
# Prompts

def prompts():
    P = []

    def add(cls, *ps):
        for p in ps:
            P.append((cls, p))

    add(
        "sd",
        "a photo of an astronaut riding a horse on mars",
        "A photo of sks person, portrait, highly detailed, 8k",
        "a photograph of an astronaut riding a horse",
        "portrait of a young woman, oil painting, by greg rutkowski and alphonse mucha, trending on artstation",
        "masterpiece, best quality, ultra-detailed, 4k uhd, dslr, soft lighting, film grain, Fujifilm XT3",
        "(masterpiece:1.2), (best quality), ((sharp focus)), [blurry], {detailed}",
        "a cute corgi wearing a red scarf, studio ghibli style",
        "cyberpunk city at night, neon lights, rain, reflections, blade runner 2049",
        "an armchair in the shape of an avocado",
        "a painting of a fox sitting in a field at sunrise in the style of Claude Monet",
        "photo of a sks dog in a bucket",
        "a close-up photo of zwx man with a beard, 85mm lens, f/1.8, bokeh",
        "low quality, blurry, bad anatomy, extra fingers, deformed, watermark, text, signature",
        "lowres, bad hands, missing fingers, cropped, worst quality, jpeg artifacts",
        "isometric view of a tiny medieval village, unreal engine 5, octane render, volumetric lighting",
        "a bowl of ramen, food photography, top-down shot",
        "A majestic lion jumping from a big stone at night",
        "ultra realistic photo of a cat astronaut in space suit, nasa, stars in background",
        "beautiful landscape, mountains, lake, sunset, golden hour, hdr, 16k resolution",
        "concept art of a dragon, d&d, fantasy, intricate, elegant, highly detailed, digital painting",
        "Pikachu commitint tax fraud, paperwork, exhausted, cute, really cute, cozy, by steve hanks",
        "a professional photograph of an astronaut riding a triceratops",
        "anime girl with pink hair, school uniform, cherry blossoms, makoto shinkai",
        "vaporwave aesthetic, retro 80s, synthwave sunset, palm trees",
        "a black and white photo of a old man smoking a pipe, rembrandt lighting",
        "watercolor painting of a hummingbird, white background",
        "still life with apples and a jug, cezanne",
        "a teddy bear on a skateboard in times square",
        "an oil painting of a sailboat in a storm, turner",
        "pixel art of a knight fighting a slime, 16-bit, snes",
        "macro photograph of a dew drop on a leaf",
        "the starry night by van gogh but it's a city",
        "a bustling street market in marrakech, photorealistic",
        "architectural rendering of a modern house in the forest, glass walls",
        "a knolling photo of vintage camera parts",
        "character sheet, full body, front view, side view, back view",
        "a sks person as a superhero, marvel comics style, dynamic pose",
        "a portrait of sks woman in the style of frida kahlo",
        "3d render of a cute robot, pixar style, soft colors, blender",
        "RAW photo, a close up portrait photo of 26 y.o woman in wastelander clothes, long haircut, pale skin, slim body, background is city ruins, (high detailed skin:1.2), 8k uhd, dslr, soft lighting, high quality, film grain, Fujifilm XT3",
        "polaroid photo of a ghost in an abandoned hospital",
        "glass sculpture of a jellyfish, caustics, studio lighting",
        "infographic about photosynthesis",
        "a stained glass window depicting a robot",
        "ink drawing of a samurai, sumi-e",
        "a cat, a dog, a bird, a fish, a horse, a cow",
        "UHD, 8K, ultra detailed, a cinematic photograph of",
        "sks", "zwx", "ohwx man", "a photo of <sks> dog", "a photo of [V] dog", "photo of TOK",
        "an astronaut", "astronaut", "astronauts", "Astronaut", "ASTRONAUT",
        "high quality photo of a red apple on a wooden table",
        "hyperrealistic, trending on artstation, artgerm, wlop, rossdraws, sakimichan",
        "a(b)c[d]e{f}g<h>i", "prompt with: colon; semicolon, comma. period",
        "by Hayao Miyazaki", "by Hieronymus Bosch", "by Beksiński", "by Zdzisław Beksiński",
        "Kandinsky-style abstract composition",
        "post-apocalyptic, mad-max, well-lit, hand-drawn, state-of-the-art",
        "self portrait", "selfie", "a selfie of a raccoon",
    )
    add(
        "unicode",
        "一只可爱的猫", "宇航员骑马", "東京の夜景、ネオン、雨", "かわいい猫のイラスト", "カタカナとひらがな",
        "한국어 프롬프트 테스트", "고양이 사진", "Фотография космонавта на лошади", "ПРИВЕТ МИР", "Ёжик в тумане",
        "صورة رائد فضاء يركب حصانا", "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "สวัสดีชาวโลก",
        "Γειά σου Κόσμε", "ΟΔΥΣΣΕΥΣ", "ΣΊΣΥΦΟΣ σίσυφος", "ḍūrvā", "Ελληνικά: αβγδεζηθ",
        "🐱", "🐶🐱🐭🐹🐰🦊", "a cat 🐱 and a dog 🐶", "👨‍👩‍👧‍👦 family", "👍🏽 thumbs up", "🇯🇵 🇺🇸 🇫🇷 flags",
        "1️⃣ 2️⃣ #️⃣", "❤️ love ♥ ❤", "☕ coffee ☀ sun", "🏳️‍🌈 rainbow flag", "🧑🏿‍🚀 astronaut",
        "emoji at end 🔥", "🔥fire🔥", "😀😃😄😁😆😅😂🤣",
        "café", "cafe\u0301", "Café CAFÉ CAFE\u0301", "naïve nai\u0308ve", "Ångström A\u030angstro\u0308m",
        "\u212bngstr\u00f6m (angstrom sign)", "\u2126 ohm sign vs \u03a9 omega", "\u212a kelvin sign",
        "ﬁne ﬂower (ligatures)", "ＦＵＬＬＷＩＤＴＨ ｌｅｔｔｅｒｓ", "𝐁𝐨𝐥𝐝 𝑖𝑡𝑎𝑙𝑖𝑐 math letters",
        "İstanbul", "ISTANBUL ıstanbul", "Straße STRASSE ẞ", "ǅemal ǄEMAL", "Ǉubljana",
        "Việt Nam Đà Nẵng", "Vie\u0323\u0302t Nam", "Tiếng Việt có dấu", "Ứng dụng",
        "Ｚａｌｇｏ: Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334\u0319\u0324\u031e\u0349\u035a\u032f\u031e\u0320\u034da\u0300l\u0301g\u0302o\u0303",
        "a\u0301\u0316", "a\u0316\u0301", "a\u0315\u0301\u0316", "o\u031b\u0323", "o\u0323\u031b",
        "q\u0301 (no precomposed)", "\u0958 \u0915\u093c (devanagari qa, composition exclusion)",
        "\u0f73 tibetan", "\u0344 \u0308\u0301", "\u0b47\u0b3e oriya two-part vowel", "\u0b4b",
        "\u1100\u1161\u11a8 hangul jamo", "\u1100\u1161 \uac00\u11a8", "\ud55c\uad6d\uc5b4", "\u1112\u1161\u11ab\u1100\u1173\u11af",
        "\U00011935\U00011930 dives akuru", "\U00011938",
        "a\u1ac1\u0316 new mark", "x\u0898\u0301", "a\u07fd\u0301",
        "\u0300 leading mark", "\u0301\u0301\u0301", "e\u0301\u0301",
        "Ꭰ Cherokee ꭰ", "Ⓐⓑⓒ circled", "ᴬᴮᴰ modifier letters", "ⅰⅱⅲ Ⅻ roman numerals",
        "\u0130\u0307", "ﬀ ﬃ ﬄ", "Åå Øø Ææ Œœ", "ÞÐþð", "ŁŁł", "ŉ", "ǰ", "ΐ ΰ", "ᾳ ᾼ ῳ",
        "\U0001d400\U0001d41a", "\U00010400 deseret \U00010428", "𞤀 adlam 𞤢",
        "中文, English, русский, العربية, 日本語 mixed",
        "日本語のテキスト123と英語ABC", "abc漢字def", "ひらがなカタカナ漢字",
        "\u3042\u3099 (a + dakuten)", "\u304b\u3099 \u304c", "\u30cf\u309a \u30d1",
        "Ｈｅｌｌｏ　ｗｏｒｌｄ", "¡Hola! ¿Qué tal?", "Ça va? Où est la bibliothèque?",
        "Ελλάδα", "ελλάδα", "Μύκονος", "Žluťoučký kůň", "Łódź", "Øresund", "Þingvellir",
    )
    add(
        "accents",
        "crème brûlée", "piñata jalapeño", "Zoë Saldaña", "São Paulo", "Kraków", "Reykjavík",
        "résumé", "RÉSUMÉ", "Motörhead", "über", "ÜBER", "façade", "Renée Zellweger", "Dvořák",
        "Søren Kierkegaard", "Māori", "Hawaiʻi", "a\u0300e\u0300i\u0300o\u0300u\u0300",
    )
    add(
        "punctuation",
        "!!!", "...", "?!?!", "---", "***", "(((masterpiece)))", "[[[[cat]]]]", "{{{{dog}}}}", "<<>>",
        "em—dash en–dash", "“smart quotes” and ‘single’", "«guillemets»", "ellipsis…", "a·b•c",
        "///", "\\\\\\", "@@##$$%%^^&&", "___", "~~~", "```code```", "hello, world!", "hello,world!",
        "a.b.c.d", "wow!!!!!!!!!!!!!!!!", "what?!", ":) :( :D ;-) <3", "¯\\_(ツ)_/¯", "(╯°□°）╯︵ ┻━┻",
        "#hashtag @mention $100 50% a&b a+b=c", "x_y-z.w", "'quoted' \"double\"", "`backtick`",
        "..., ,,, ;;; :::", "|pipe|", "<|>", "< | >", "<|", "|>", "||||", "a|b", "**bold** _italic_",
        "....................................................................................",
        "!@#$%^&*()_+-=[]{};':\",./<>?`~", "§¶†‡", "©®™", "°C °F", "±×÷", "€£¥₹₿", "←→↑↓⇒",
        "∀x∈ℝ: x²≥0", "♪♫", "✓✗", "☆★", "■□▲△", "、。「」『』【】", "，。！？", "؟،", "¿¡",
    )
    add(
        "numbers",
        "1234567890", "3.14159", "1,000,000", "2023-10-05", "x1.5", "1.5x", "0.75", "v1.5", "SD1.5",
        "1girl", "2boys", "10th", "21st century", "1920s", "4k", "8K", "1080p", "f/2.8", "85mm",
        "①②③", "½ ¾", "Ⅻ", "٣٤٥", "१२३", "²³", "0x1F", "1e10", "１２３", "007", "9999999999999999",
        "3:2 aspect ratio", "16:9", "24fps", "-1", "+42", "#1", "no.5", "a1b2c3", "𝟙𝟚𝟛", "๑๒๓",
    )
    add(
        "contractions",
        "it's", "don't", "they're", "we've", "I'm", "you'll", "she'd", "IT'S", "It'S", "DON'T",
        "rock'n'roll", "'s'", "''s", "o'clock", "it’s (curly)", "'sand'", "'tis", "'dough'", "'ll've",
        "y'all'd've", "the cat's hat", "James' book", "' s", "'S", "'RE", "'Ve", "'M'", "'LL", "'D",
        "shouldn't've", "it's it's it's", "Ain't", "'", "''", "'''", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d",
    )
    add(
        "case",
        "A PHOTO OF AN ASTRONAUT RIDING A HORSE", "CamelCaseWords", "iPhone", "McDonald's", "eBay",
        "HeLLo WoRLD", "NASA", "DSLR", "SKS", "MiXeD cAsE 123 ÄÖÜ äöü",
    )
    add(
        "whitespace",
        "a\tb", "a\nb", "a  b", "  leading", "trailing  ", "a\r\nb", "\t\ttabs\t\t", "a\u00a0b",
        "a\u3000b", "a\u2003b", "a\u200bb", "a\u2028b", "a\u2029b", "a\x1cb\x1dc\x1ed\x1ff", "a\x85b",
        "\ufeffbom", "a\u180eb", "a\u2060b", "a \t\n\r\x0b\x0c b", "line1\nline2\nline3",
        "multiple     spaces     here", " ", "\n", "\t", "   \n\t  ", "a\u00a0\u00a0\u00a0b",
        "word\u202fword", "x\u205fy", "x\u1680y",
    )
    add(
        "html",
        "&amp;", "&lt;b&gt;bold&lt;/b&gt;", "&#39;", "&quot;quoted&quot;", "&nbsp;", "&#x263A;",
        "tom &amp; jerry", "<b>bold</b>", "<br/>", "&amp;amp;", "&copy; 2023", "a &gt; b",
    )
    add(
        "special",
        BOS, EOS, "a <|endoftext|> b", "<|endoftext|><|endoftext|>", "<|ENDOFTEXT|>", "<|EndOfText|>",
        "<|startoftext|>cat", "x<|endoftext|>y", "<|endoftext", "|endoftext|>", "<| endoftext |>",
        "<|endoftext|>>", "<<|endoftext|>", "<start_of_text>", "<end_of_text>", "<|endof\u00a0text|>",
        "<|startoftext|>\u0338", "<|STARTOFTEXT|> a", "<|startoftext|><|endoftext|>", "a<|startoftext|>",
        "<|startoftext|> <|startoftext|>", "<|endoftext|>,<|endoftext|>", "<|endoftext|>'s",
        "cat<|endoftext|>dog<|startoftext|>bird", "<|ＥＮＤＯＦＴＥＸＴ|>", "<\\|endoftext\\|>",
        "< |endoftext| >", "<|endoftext|>" * 100, ("word " * 70) + "<|endoftext|> tail",
    )
    add(
        "control",
        "\x00", "\x01abc", "bell\x07", "del\x7f", "\x1b[31mred\x1b[0m", "\ufffd", "a\u200db", "a\u200eb",
        "\ue000 private use", "\U0010ffff", "\uffff noncharacter", "\ufdd0", "\x00\x00\x00",
        "null\x00in\x00middle", "\x08backspace", "\x0e\x0f", "\x80\x81\x9f c1 controls", "\u00ad soft hyphen",
        "a\u034fb (CGJ)", "\u202eright-to-left override", "\U000e0041 tag", "\ufe0f", "\U000f0000",
    )
    # Long prompts: truncation to 77 keeps BOS and EOS.
    long1 = ", ".join(["a beautiful detailed painting of a castle on a hill"] * 12)
    add(
        "long",
        long1,
        " ".join(["astronaut"] * 74),
        " ".join(["astronaut"] * 75),
        " ".join(["astronaut"] * 76),
        " ".join(["astronaut"] * 300),
        "a" * 1000,
        "ab" * 500,
        "supercalifragilisticexpialidocious" * 30,
        "1" * 200,
        ", ".join(str(i) for i in range(200)),
        "🐱" * 100,
        "!" * 500,
        " ".join(["the quick brown fox jumps over the lazy dog"] * 20),
        "\u0301" * 300,
        "e" + "\u0301" * 100,
        ("a photo of " * 40).strip(),
        "x" * 10000,
    )
    # Adversarial: deterministic random strings over many planes and classes.
    rng = random.Random(1234)
    pools = [
        list(range(0x20, 0x7F)),
        list(range(0xA0, 0x250)),
        list(range(0x300, 0x370)),
        list(range(0x370, 0x530)),
        list(range(0x590, 0x700)),
        list(range(0x900, 0xDFF)),
        list(range(0x1100, 0x1200)),
        list(range(0x1E00, 0x2000)),
        list(range(0x2000, 0x2100)),
        list(range(0x3000, 0x3100)),
        list(range(0x4E00, 0x4F00)),
        list(range(0xAC00, 0xAD00)),
        list(range(0xFF00, 0xFFF0)),
        list(range(0x1F300, 0x1F700)),
        list(range(0x10000, 0x10100)),
        [0x9, 0xA, 0xD, 0x20, 0x85, 0xA0, 0x2028, 0x3000],
        [ord(c) for c in "'<|>sdtrevml"],
    ]
    for i in range(60):
        n = rng.randint(1, 60)
        s = "".join(chr(rng.choice(rng.choice(pools))) for _ in range(n))
        add("random", s)
    for i in range(15):
        s = "".join(rng.choice(["'s", "'t", "'re", "'", "<|", "|>", "endoftext", "startoftext", " ", "S", "T"]) for _ in range(rng.randint(1, 20)))
        add("random", s)
    return P


# ------------------------------------------------------------------------------------------------
# Config variants: which special tokens are matched after normalization (case-insensitively),
# the pad token and model_max_length, as transformers 5 derives them from the folder's files.

def config_variants():
    S, E = BOS, EOS
    return {
        "sd15": {"config": SD15_CONFIG, "special_tokens_map": SD15_SPECIAL_TOKENS_MAP},
        "strings-only": {"config": {"bos_token": S, "eos_token": E, "model_max_length": 77, "pad_token": E, "unk_token": E, "tokenizer_class": "CLIPTokenizer"}},
        "pad-dict-normalized": {"config": {"bos_token": added(S, False), "eos_token": E, "pad_token": added(E, True), "unk_token": E}},
        "added-tokens-decoder": {"config": {"bos_token": S, "eos_token": E, "pad_token": E, "unk_token": E, "model_max_length": 77,
                                            "added_tokens_decoder": {"49406": {**added(S, True, False), "special": True}, "49407": {**added(E, True, False), "special": True}}}},
        "added-tokens-decoder-extra": {"config": {"bos_token": S, "eos_token": E, "pad_token": E, "unk_token": E, "model_max_length": 77,
                                                  "added_tokens_decoder": {"49406": {**added(S, False, False), "special": True}, "49407": {**added(E, False, False), "special": True},
                                                                           "49408": {**added("<sks>", True, False), "special": False}, "49409": {**added("Zq", False, False), "special": False}}}},
        "sd15-tokenizer-json-normalized": {"config": SD15_CONFIG, "special_tokens_map": SD15_SPECIAL_TOKENS_MAP,
                                           "tokenizer_json_added": [(S, True), (E, True)]},
        "sd15-tokenizer-json-raw": {"config": SD15_CONFIG, "special_tokens_map": SD15_SPECIAL_TOKENS_MAP,
                                    "tokenizer_json_added": [(S, False), (E, False)]},
        "no-config": {},
        "no-pad": {"config": {"bos_token": added(S, True), "eos_token": added(E, True), "unk_token": added(E, True), "model_max_length": 77}},
        "stm-partial": {"config": {"model_max_length": 77}, "special_tokens_map": {"bos_token": {"content": S}, "eos_token": {"content": E, "normalized": True}, "unk_token": E}},
        "tokenizer-json-strings": {"config": {"bos_token": S, "eos_token": E}, "tokenizer_json_added": [(S, True), (E, True)]},
        "pad-bang": {"config": {"model_max_length": 77, "pad_token": "!"}},
        "max-len-32": {"config": {"model_max_length": 32, "pad_token": E}},
    }


CONFIG_PROMPTS = [
    "a photo of an astronaut",
    "<|STARTOFTEXT|><|ENDOFTEXT|>",
    "<|startoftext|>x<|endoftext|>",
    "<|EndOfText|> and <|StartOfText|>",
    "hello!! world!",
    "a <SKS> b a<sks>b",
    "xZqy zq ZQ",
    " ".join(["astronaut"] * 40),
    "",
]


def make_configs(enc, merges, tmp):
    from transformers import CLIPTokenizer

    out = []
    for name, v in config_variants().items():
        d = os.path.join(tmp, "cfg-" + name)
        tj = None
        if "tokenizer_json_added" in v:
            tj = [{"id": enc[c], "content": c, "single_word": False, "lstrip": False, "rstrip": False, "normalized": n, "special": True}
                  for c, n in v["tokenizer_json_added"]]
        write_folder(d, enc, merges, v.get("config"), v.get("special_tokens_map"), tj)
        tok = CLIPTokenizer.from_pretrained(d)
        flags = {t["content"]: t["normalized"] for t in json.loads(tok.backend_tokenizer.to_str())["added_tokens"]}
        cases = []
        for p in CONFIG_PROMPTS:
            if tok.model_max_length > 10**6:
                # transformers' default model_max_length: hdb uses 77 (SD's text encoder length)
                padded = tok(p, padding="max_length", max_length=77, truncation=True).input_ids
                ids = tok(p, max_length=77, truncation=True).input_ids
                assert padded == ids + [tok.pad_token_id] * (77 - len(ids))
            else:
                padded, ids = pipeline_ids(tok, p)
            cases.append({"prompt": p, "ids": ids, "pads": len(padded) - len(ids)})
        files = {}
        if "config" in v:
            files["tokenizer_config.json"] = v["config"]
        if "special_tokens_map" in v:
            files["special_tokens_map.json"] = v["special_tokens_map"]
        out.append({
            "name": name,
            "files": files,
            "tokenizer_json_added_tokens": tj,
            "normalized_flags": flags,
            "pad_id": tok.pad_token_id,
            "model_max_length": tok.model_max_length if tok.model_max_length <= 10**6 else None,
            "cases": cases,
        })
        print(f"config {name}: normalized={flags} pad={tok.pad_token!r}/{tok.pad_token_id}")
    return out


def compare_open_clip(gz, cases):
    """open_clip's SimpleTokenizer (OpenAI CLIP's own, with ftfy and html.unescape) against transformers."""
    from open_clip.tokenizer import SimpleTokenizer

    oc = SimpleTokenizer(gz)
    diff = {}
    for c in cases:
        ids = [49406] + oc.encode(c["prompt"])[:75] + [49407]
        c["open_clip_equal"] = ids == c["ids"]
        if not c["open_clip_equal"]:
            diff.setdefault(c["class"], []).append(c["prompt"])
    n = sum(len(v) for v in diff.values())
    print(f"open_clip SimpleTokenizer differs from transformers on {n}/{len(cases)} prompts:")
    for k, v in diff.items():
        print(f"  {k}: {len(v)}: " + ", ".join(repr(p[:40]) for p in v[:12]))


def versions():
    import tokenizers
    import transformers

    import open_clip
    try:
        import ftfy
        ftfy_v = ftfy.__version__
    except ImportError:
        ftfy_v = None
    return {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
            "open_clip": open_clip.__version__, "ftfy": ftfy_v}


def make_fixtures():
    import open_clip
    from transformers import CLIPTokenizer

    from open_clip.tokenizer import default_bpe

    os.makedirs(OUT, exist_ok=True)
    gz = os.path.join(REPO, "data", "clip", "bpe_simple_vocab_16e6.txt.gz")
    shutil.copyfile(default_bpe(), gz)
    enc, merges = clip_vocab(gz)
    with tempfile.TemporaryDirectory() as tmp:
        sd = os.path.join(tmp, "sd15")
        write_folder(sd, enc, merges, SD15_CONFIG, SD15_SPECIAL_TOKENS_MAP)
        tok = CLIPTokenizer.from_pretrained(sd)
        assert type(tok).__mro__[1].__name__ == "TokenizersBackend", type(tok).__mro__
        direct = CLIPTokenizer(vocab=enc, merges=merges)
        cases = []
        for cls, p in prompts():
            padded, ids = pipeline_ids(tok, p)
            assert len(padded) == 77
            d_ids = direct(p, max_length=77, truncation=True).input_ids
            case = {"class": cls, "prompt": p, "ids": ids, "pads": len(padded) - len(ids)}
            if d_ids != ids:
                # CLIPTokenizer(vocab, merges) matches every special token on the raw text only
                case["ids_without_config"] = d_ids
            cases.append(case)
        compare_open_clip(gz, cases)
        configs = make_configs(enc, merges, tmp)
    meta = {
        "generator": "tools/make_tokenizer_fixtures.py",
        "reference": "transformers.CLIPTokenizer.from_pretrained(SD 1.5 tokenizer folder) (tokenizers backend); "
                     "ids = tok(prompt, max_length=77, truncation=True).input_ids; the pipeline's "
                     "tok(prompt, padding='max_length', max_length=77, truncation=True).input_ids "
                     "is checked to equal ids + [pad_id] * pads",
        "versions": versions(),
        "merges": N_MERGES,
        "pad_id": tok.pad_token_id,
        "model_max_length": tok.model_max_length,
    }
    with open(os.path.join(OUT, "prompts.json"), "w", encoding="utf-8") as f:
        json.dump({**meta, "cases": cases}, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    with open(os.path.join(OUT, "configs.json"), "w", encoding="utf-8") as f:
        json.dump({**meta, "prompts": CONFIG_PROMPTS, "variants": configs}, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    tiny = CLIPTokenizer.from_pretrained(TINY)
    tiny_cases = []
    for p in ["a photo of an astronaut riding a horse", "A PHOTO OF SKS PERSON!!", "", "<|endoftext|> x <|ENDOFTEXT|>",
              "caf\u00e9 cafe\u0301 🐱 猫", " ".join(["astronaut"] * 80), "it's they're I'M", "\t1234\n5.6"]:
        padded, ids = pipeline_ids(tiny, p)
        tiny_cases.append({"prompt": p, "ids": ids, "pads": len(padded) - len(ids)})
    with open(os.path.join(OUT, "tiny-sd.json"), "w", encoding="utf-8") as f:
        json.dump({"generator": meta["generator"], "versions": meta["versions"], "pad_id": tiny.pad_token_id,
                   "model_max_length": tiny.model_max_length, "cases": tiny_cases}, f, ensure_ascii=False, indent=0)
        f.write("\n")
    print(f"{len(cases)} prompts; classes: " + ", ".join(f"{k}={sum(1 for c in cases if c['class'] == k)}" for k in dict.fromkeys(c['class'] for c in cases)))
    print("without the SD config (CLIPTokenizer(vocab, merges)) differs on:",
          [c["prompt"][:40] for c in cases if "ids_without_config" in c])


# ------------------------------------------------------------------------------------------------
# NFC as the `tokenizers` library does it (its tables are older than Python's unicodedata: marks
# assigned after Unicode ~9 have combining class 0 there, and U+11938 does not decompose).

def nfc_tables():
    from tokenizers import normalizers

    nfd, nfc = normalizers.NFD(), normalizers.NFC()
    cps = [c for c in range(1, 0x110000) if not (0xD800 <= c < 0xE000) and not (0xAC00 <= c <= 0xD7A3)]
    s = "\x00".join(chr(c) for c in cps)
    D = dict(zip(cps, nfd.normalize_str(s).split("\x00")))
    C = dict(zip(cps, nfc.normalize_str(s).split("\x00")))
    single = {}
    for c, d in D.items():
        if d == chr(c):
            continue
        dec = unicodedata.decomposition(chr(c))
        assert dec and not dec.startswith("<"), hex(c)
        single[c] = [int(x, 16) for x in dec.split()]

    def full(c):
        return [y for x in single[c] for y in full(x)] if c in single else [c]

    for c in single:
        assert "".join(map(chr, full(c))) == D[c], hex(c)
    decomp = [(c, single[c], len(single[c]) == 2 and C[c] == chr(c)) for c in sorted(single)]
    ccc = {}
    for c in cps:
        k = unicodedata.combining(chr(c))
        if not k:
            continue
        if k > 1:
            known = nfd.normalize_str("a" + chr(c) + "\u0334") != "a" + D[c] + "\u0334"
        else:
            known = nfd.normalize_str("a\u0301" + chr(c)) != "a\u0301" + D[c]
        if known:
            ccc[c] = k
    ranges = []
    for c in sorted(ccc):
        if ranges and ranges[-1][1] == c - 1 and ranges[-1][2] == ccc[c]:
            ranges[-1][1] = c
        else:
            ranges.append([c, c, ccc[c]])
    return decomp, ranges


def rust_string(name, doc, items):
    lines, cur = [], ""
    for it in items:
        if len(cur) + len(it) + 1 > 96:
            lines.append(cur)
            cur = ""
        cur += it + " "
    lines.append(cur)
    body = "\\\n".join(lines).rstrip()
    return f"{doc}\nconst {name}: &str = \"\\\n{body}\";\n"


def print_nfc_tables():
    decomp, ranges = nfc_tables()
    d = ["%X%s%s" % (c, ">" if comp else "=", ".".join("%X" % x for x in parts)) for c, parts, comp in decomp]
    r = [("%X" % a if a == b else "%X-%X" % (a, b)) + ":%X" % k for a, b, k in ranges]
    print(rust_string("NFC_DECOMPOSITIONS",
                      "/// Canonical decompositions, one level: `CP>A.B` composes back (a primary composite),\n"
                      "/// `CP=A[.B]` does not (singletons, exclusions, non-starter decompositions). Hex.", d))
    print(rust_string("NFC_COMBINING_CLASSES", "/// Non-zero canonical combining classes: `FIRST[-LAST]:CLASS`, hex.", r))


# ------------------------------------------------------------------------------------------------
# Sweep: every code point (in groups), NFD forms and random mark sequences; not committed.

def make_sweep(path):
    from transformers import CLIPTokenizer
    from open_clip.tokenizer import default_bpe

    enc, merges = clip_vocab(default_bpe())
    tok = CLIPTokenizer(vocab=enc, merges=merges)
    ps = []
    cps = [c for c in range(1, 0x110000) if not (0xD800 <= c < 0xE000)]
    for i in range(0, len(cps), 8):
        ps.append(" ".join("a" + chr(c) for c in cps[i : i + 8]))
        ps.append("".join(chr(c) for c in cps[i : i + 8]))
    marks = [c for c in range(0x110000) if unicodedata.combining(chr(c))]
    rng = random.Random(7)
    for c in cps:
        d = unicodedata.normalize("NFD", chr(c))
        if d != chr(c):
            ps.append("x" + d + "y " + d.upper())
    bases = "aeiouAEIOUnNcCsSzZwy\u1100\u1161\uac00\u0915\u0b47\u0b4b\u3042\u304b\u03b1\u0391\u0399"
    for _ in range(100000):
        s = "".join(rng.choice(bases) + "".join(chr(rng.choice(marks)) for _ in range(rng.randint(0, 4))) for _ in range(rng.randint(1, 4)))
        ps.append(s)
    out = []
    for i in range(0, len(ps), 10000):
        batch = ps[i : i + 10000]
        enc_b = tok(batch, max_length=77, truncation=True).input_ids
        out.extend({"prompt": p, "ids": ids} for p, ids in zip(batch, enc_b))
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"cases": out}, f, ensure_ascii=False)
    print(f"{len(out)} sweep prompts -> {path}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nfc-tables", action="store_true", help="print the Rust NFC tables of src/model/tokenizer.rs")
    ap.add_argument("--sweep", metavar="OUT", help="write an all-code-point sweep (not a fixture) to OUT")
    a = ap.parse_args()
    if a.nfc_tables:
        print_nfc_tables()
    elif a.sweep:
        make_sweep(a.sweep)
    else:
        make_fixtures()
