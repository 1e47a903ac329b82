"""A deterministic set of hostile captions for the tokenizer parity test (docs/tokenizer.md).

Pick-a-Pic-like prompts, and everything typed text brings: Unicode of many scripts, emoji
(ZWJ sequences, skin tones, flags, keycaps), HTML entities (named, numeric, double-escaped,
invalid), curly quotes, ligatures, full- and halfwidth forms, control characters, combining
marks, very long lines, empty and whitespace-only lines, numbers, contractions, the special
tokens typed inside a caption, mojibake, and characters newer than Python's Unicode database.
Each caption has a kind (the group it was drawn from); no caption holds a '\\n'.

CLI: python -m dde_tools.caption_set --out FILE [--seed N] [--kinds] [--every-code-point]
writes one caption per line, UTF-8, '\\n' line ends (--kinds: "KIND\\tCAPTION" lines instead;
--every-code-point: the lines of every_code_point() instead of the caption set).
"""

from __future__ import annotations

import argparse
import random
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import regex

from dde_tools.common import ToolError, run_main
from dde_tools.fixtures import ADJECTIVES, NOUNS, PLACES, STYLES, make_captions

MIN_CAPTIONS = 5000


@dataclass(frozen=True)
class Caption:
    kind: str
    text: str


# Short phrases per script; the sentences need not be good prose, only the script's letters,
# marks, digits and punctuation.
SCRIPTS: dict[str, list[str]] = {
    "latin_accents": [
        "Crème brûlée à la française, façade du château",
        "Straße in München, Grüße aus Köln, ÄÖÜ äöü ß ẞ",
        "El niño pequeño comió jalapeños en la montaña ¿verdad? ¡sí!",
        "Ação e coração: São Paulo, Mãe, pão, irmã",
        "Zażółć gęślą jaźń, Łódź, Kraków",
        "Příliš žluťoučký kůň úpěl ďábelské ódy",
        "Tiếng Việt: Hà Nội, phở bò, cà phê sữa đá, Nguyễn",
        "İstanbul'da ılık bir gün, IŞIK ve ışık, Ağrı Dağı",
        "Română: știință, țară, Timișoara",
        "Íslenska: Þórsmörk, Ægir, ðæmi",
        "Dansk og norsk: Ærø, Østerbro, Ålesund",
        "Magyar: árvíztűrő tükörfúrógép, Őrség",
        "Eesti: Tõnu, Pärnu, šokolaad",
        "Lietuvių: Šiauliai, ąžuolas, Ėriškiai",
        "Malti: Ħal Qormi, ċirasa, żiemel",
        "Esperanto: ĉiuĵaŭde, ŝipo, ĝardeno",
    ],
    "greek": [
        "Καλημέρα κόσμε, ΟΔΥΣΣΕΥΣ και η Ιθάκη",
        "ΣΟΦΙΑ ΣΟΦΟΣ, σοφός, Ἀθῆναι ᾄδω",
        "ὁ λόγος ἦν πρὸς τὸν θεόν, ᾠδή",
        "Ελλάδα: Μύκονος, Σαντορίνη, Ακρόπολη",
    ],
    "cyrillic": [
        "Привет, мир! Москва, Санкт-Петербург",
        "Съешь же ещё этих мягких французских булок, да выпей чаю",
        "Україна: Київ, Львів, їжак, ґанок",
        "Србија: Београд, Ђорђе, Љубљана, Његош",
        "Български: щъркел, ЮЖНА ГРАНИЦА",
        "Қазақстан: Алматы, Өскемен, Ұлытау",
    ],
    "armenian_georgian": [
        "Հայաստան, Երևան, Արարատ",
        "საქართველო, თბილისი, ქართული ენა",
    ],
    "arabic": [
        "مرحبا بالعالم، القاهرة والرياض",
        "اللُّغَةُ العَرَبِيَّةُ جَمِيلَةٌ",
        "فارسی: تهران، اصفهان، گل و بلبل",
        "اردو: لاہور، کراچی، پاکستان",
        "قطة صغيرة في حديقة ١٢٣ ٤٥٦",
    ],
    "hebrew": [
        "שלום עולם, ירושלים ותל אביב",
        "בְּרֵאשִׁית בָּרָא אֱלֹהִים",
        "חתול שחור על גג, 2023",
    ],
    "indic": [
        "नमस्ते दुनिया, भारत, हिन्दी भाषा",
        "क़लम और ज़मीन, फ़िल्म, ड़",
        "বাংলা ভাষা, ঢাকা, কলকাতা",
        "தமிழ் நாடு, சென்னை, வணக்கம்",
        "తెలుగు, హైదరాబాద్",
        "ਪੰਜਾਬੀ, ਅੰਮ੍ਰਿਤਸਰ",
        "ગુજરાતી, અમદાવાદ",
        "ಕನ್ನಡ, ಬೆಂಗಳೂರು",
        "മലയാളം, തിരുവനന്തപുരം",
        "සිංහල, කොළඹ",
        "नेपाली: काठमाडौं, सगरमाथा ०१२३४५",
    ],
    "southeast_asian": [
        "สวัสดีครับ กรุงเทพมหานคร แมวน้อย",
        "ພາສາລາວ, ວຽງຈັນ",
        "ភាសាខ្មែរ, ភ្នំពេញ, អង្គរវត្ត",
        "မြန်မာဘာသာ, ရန်ကုန်",
        "Tagalog: ᜊᜌ᜔ᜊᜌᜒᜈ᜔",
    ],
    "cjk": [
        "一只可爱的猫在樱花树下，水彩画",
        "東京の夜景、ネオン、サイバーパンク、高品質",
        "ひらがなとカタカナ、漢字まじり文",
        "臺灣繁體中文：龍、國、體",
        "北京烤鸭 上海 广州 深圳 2024年",
        "𠀋𠂢𡈽 CJK Extension B 文字",
        "㐀㐁㐂 Extension A, 兀 compatibility 﨑",
    ],
    "hangul": [
        "안녕하세요 세계, 서울의 밤",
        "고양이와 강아지가 공원에서 놀고 있다",
        "한국어 자모 각 조합",
    ],
    "other_scripts": [
        "ኢትዮጵያ, አዲስ አበባ, ሰላም",
        "ᏣᎳᎩ ᎦᏬᏂᎯᏍᏗ Cherokee",
        "ᐃᓄᒃᑎᑐᑦ Inuktitut",
        "ᠮᠣᠩᠭᠣᠯ Mongolian",
        "བོད་ཡིག Tibetan ཀཁགང",
        "ߒߞߏ N'Ko ߊߓߕ",
        "ⴰⵣⵓⵍ Tifinagh",
        "𐐀𐐁𐐂 Deseret 𐐨𐐩",
        "𐒰𐒱𐒲 Osage 𐓘𐓙",
        "𞤀𞤁𞤂 Adlam 𞤢𞤣",
        "ᚠᚢᚦᚨᚱᚲ runes, ᚛ᚑᚌᚐᚋ᚜ ogham",
        "𓀀𓀁𓂀 hieroglyphs",
        "ⲁⲃⲅ Coptic, 𐌰𐌱𐌲 Gothic",
    ],
    "math_symbols": [
        "𝐀𝐁𝐂 𝑥𝑦𝑧 𝔄𝔅 𝕏𝕐 mathematical letters",
        "∀x∈ℝ: x² ≥ 0, ∑ₙ 1/n², ∫ f(x) dx ≈ π",
        "℃ ℉ № ™ ℓ Ω Å K µ",
        "→ ← ⇒ ⇔ ∞ ± × ÷ ≠ ≤ ≥",
        "♠ ♣ ♥ ♦ ★ ☆ ☀ ☂ ♪ ♫ ☯ ☮",
        "¢ £ ¥ € ₹ ₽ ₩ ₿ $100",
        "box drawing ┌─┐│└┘ ░▒▓█",
    ],
}

EMOJI = [
    "🐱", "🐶", "🦊", "🐉", "🌸", "🌊", "🔥", "✨", "🎨", "🖼️", "🌈", "🍕", "☕", "🚀", "🏰", "🌙",
    "😀", "😂", "🥰", "😍", "🤖", "👻", "💀", "👽", "🧙‍♂️", "🧚‍♀️", "🧜🏾‍♀️",
    "👍🏻", "👍🏼", "👍🏽", "👍🏾", "👍🏿", "👋🏽", "🙏🏿", "💪🏼",
    "👨‍👩‍👧‍👦", "👩‍❤️‍👨", "👩🏽‍💻", "🧑🏻‍🚀", "👨🏿‍🎨", "🏳️‍🌈", "🏳️‍⚧️", "🐈‍⬛", "🐻‍❄️", "❤️‍🔥",
    "🇯🇵", "🇫🇷", "🇺🇸", "🇧🇷", "🇺🇦", "🏴󠁧󠁢󠁳󠁣󠁴󠁿", "🏴󠁧󠁢󠁷󠁬󠁳󠁿",
    "1️⃣", "#️⃣", "*️⃣", "©️", "®️", "™️", "❤", "❤️", "☺", "☺️",
    "🫨", "🩷", "🪼",  # Unicode 15.0 emoji: unknown to Python's unicodedata (14.0)
]

NAMED_ENTITIES = [
    "&amp;", "&lt;", "&gt;", "&quot;", "&apos;", "&nbsp;", "&eacute;", "&Eacute;", "&egrave;",
    "&hellip;", "&mdash;", "&ndash;", "&rsquo;", "&lsquo;", "&ldquo;", "&rdquo;", "&copy;",
    "&reg;", "&trade;", "&euro;", "&pound;", "&deg;", "&times;", "&divide;", "&frac12;",
    "&alpha;", "&Omega;", "&hearts;", "&rarr;", "&infin;", "&szlig;", "&uuml;", "&ntilde;",
    "&AMP;", "&EACUTE;", "&NTILDE;", "&SZLIG;", "&nTILDE;", "&Gt;", "&gt;", "&NotEqualTilde;",
    "&Jscr;", "&HilbertSpace;", "&checkmark;", "&fjlig;", "&ThickSpace;", "&NewLine;", "&Tab;",
    "&zwj;", "&zwnj;", "&shy;", "&lrm;", "&bsol;", "&verbar;", "&lbrace;", "&num;",
]
NUMERIC_ENTITIES = [
    "&#39;", "&#039;", "&#34;", "&#8217;", "&#8220;", "&#8221;", "&#x27;", "&#X27;", "&#x2019;",
    "&#x1F600;", "&#128512;", "&#0;", "&#x0;", "&#13;", "&#128;", "&#x80;", "&#150;", "&#159;",
    "&#65;", "&#x41;", "&#59;", "&#x3b;", "&#55296;", "&#xD800;", "&#1114111;", "&#1114112;",
    "&#xFFFE;", "&#x10FFFF;", "&#99999999999999999999999;", "&#x123456789ABCDEF0123456;",
    "&#1;", "&#11;", "&#127;", "&#xFDD0;", "&#12a;", "&#x;", "&#xZZ;", "&#;", "&#x41", "&#65",
    "&#000000000000000000065;", "&#x00000000000000000041;", "&#8203;", "&#173;", "&#160;",
]
BROKEN_ENTITIES = [
    "&amp", "&ampx;", "&notanentity;", "&;", "& amp;", "&aaaaaaaaaaaaaaaaaaaaaaaaaaaaa;",
    "&&amp;", "&amp;amp;", "&amp;amp;amp;", "&amp;lt;", "&amp;quot;", "&amp;#39;", "&amp;#x2019;",
    "&lt;b&gt;", "&lt;|endoftext|&gt;", "&amp;lt;|startoftext|&amp;gt;", "&not", "this&not that",
]

QUOTES = ["‘", "’", "‚", "‛", "“", "”", "„", "‟", "ʼ", "′", "″", "«", "»", "‹", "›", "「", "」", "『", "』", "〝", "〞"]
LIGATURES = [
    "ﬀ", "ﬁ", "ﬂ", "ﬃ", "ﬄ", "ﬅ", "ﬆ", "Ĳ", "ĳ", "ŉ", "Ǳ", "ǲ", "ǳ", "Ǆ", "ǅ", "ǆ", "Ǉ", "ǈ", "ǉ", "Ǌ", "ǋ", "ǌ",
    "æ", "œ", "Æ",
]
WIDTH = [
    "ＬＯＵＤ　ＮＯＩＳＥＳ", "ｆｕｌｌｗｉｄｔｈ ｔｅｘｔ", "１２３４５６７８９０", "！？＃＄％＆（）＊＋，－．／",
    "ｶﾀｶﾅ ﾊﾝｶｸ ｳﾞ ﾎﾟ", "Ｕﾀｰﾝ", "ﾟﾞ", "＜｜ｅｎｄｏｆｔｅｘｔ｜＞", "ＡＢＣ：ａｂｃ；", "￠￡￥￦", "ￂￃￄ ﾡﾢ", "｡｢｣､･",
    "￨￩￪￫￬￭￮", "ｗｏｗ！！", "＇ｓ ＇ｔ",
]
CONTROLS = [
    "\t", "\x0b", "\x0c", "\r", "\x00", "\x01", "\x07", "\x08", "\x0e", "\x1a", "\x1c", "\x1d",
    "\x1e", "\x1f", "\x7f", "\x80", "\x81", "\x85", "\x8d", "\x91", "\x92", "\x93", "\x94", "\x9d",
    "\x9f", "\u00a0", "\u00ad", "\u034f", "\u061c", "\u180e", "\u200b", "\u200c", "\u200d",
    "\u200e", "\u200f", "\u2028", "\u2029", "\u202a", "\u202e", "\u202f", "\u2060", "\u2066",
    "\u206a", "\u206f", "\u3000", "\ufeff", "\ufff9", "\ufffa", "\ufffb", "\ufffc", "\ufffd",
    "\U000e0001", "\U000e0041", "\x1b[31m", "\x1b[0m", "\x1b[1;32;40m", "\x1b[K", "\x1b[١m",
    "\x1b]0;title\x07", "\x1b", "\u1680", "\u2007", "\u205f",
]
COMBINING = [
    "e\u0301", "E\u0301", "a\u0300\u0301", "n\u0303", "o\u0308", "u\u0308\u0301", "c\u0327",
    "a\u0323\u0302", "a\u0302\u0323", "s\u0323\u0307", "z\u0335\u0336", "Z\u0351\u0352\u0353\u0354",
    "\u03b1\u0345", "\u03b1\u0313\u0345", "x\u0345", "\u0345", "!\u0345?", "\u0399\u0345",
    "\u1100\u1161\u11a8", "\u1112\u1161\u11ab", "\u0915\u093c", "\u0928\u093c", "\u0627\u0653",
    "\u05e9\u05c1", "i\u0307", "I\u0307", "\u0130", "\u03a3", "\u0301", " \u0301", "1\u20e3",
    "a\u034fb", "\u0e01\u0e34\u0e4c", "o\u0328\u0304", "\u1e9b\u0323", "\u212b", "\u2126", "\u00c5",
    "he\u0308\u0301\u0302\u0303\u0304\u0305\u0306\u0307llo",
]
CONTRACTIONS = [
    "it's", "don't", "we're", "they've", "I'm", "you'll", "he'd", "IT'S", "DON'T", "We'Re",
    "it’s", "don’t", "it‘s", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "cat's",
    "rock'n'roll", "'ſ", "'ſt", "ſtar", "l'amour", "o'clock", "y'all", "''s", "'''", "can't've",
    "it' s", "it 's", "'sun", "'tis", "'99", "I'd've", "Jones'", "ma'am", "ʼs", "'ſs",
]
NUMBERS = [
    "1234567890", "3.14159", "1,000,000", "½ ⅓ ¾ ⅞", "x² y³ ⁴⁵", "H₂O CO₂", "Ⅻ ⅻ Ⅳ", "١٢٣٤٥",
    "०१२३", "১২৩", "๑๒๓", "①②③ ⑩ ⑳", "2nd 3rd 21st", "2023-06-15", "4k 8k 1080p", "v1.5",
    "-5 +7 1e10 0xFF", "100%", "$9.99", "12:30pm", "1920x1080", "3d 2d 1girl 2boys", "७", "〇〇七",
    "𝟏𝟐𝟑", "⁰¹²", "₀₁₂", "１２３", "፩፪፫", "𐄇𐄈", "🔟", "0.5 .5 5.", "1/2", "10^6", "π≈3.14",
]
SPECIALS = [
    "<|endoftext|>", "<|startoftext|>", "a cat <|endoftext|> a dog", "<|endoftext|><|endoftext|>",
    "a<|endoftext|>b", "<|startoftext|>hello<|endoftext|>", "<|ENDOFTEXT|>", "<|EndOfText|>",
    "<|endoftext", "endoftext|>", "<| endoftext |>", "<<|endoftext|>>", "<|endoftext|>!",
    "!<|endoftext|>!", "wow!!!", "hello ! world", "!!!", "!", "! ! !", "a!b!c", "！", "!！!",
    "<|ſtartoftext|>", "<|startoftext|", "&lt;|endoftext|&gt;", "＜｜endoftext｜＞",
    "<|endoftext|> &amp; <b>", "&amp; <|endoftext|> &amp;", "<b>&amp;</b>", "x <lora:style:0.8> &amp; y",
    "<|endoftext|>\t", " <|endoftext|> ", "<|endoftext|>'s", "!'s", "!</w>", "</w>", "<|endoftext|></w>",
]
MOJIBAKE = [
    "cafÃ©", "Ã¼ber", "â€œquotedâ€\x9d", "donâ€™t", "Ã©tÃ©", "æ—¥æœ¬èªž", "Ð¿Ñ€Ð¸Ð²ÐµÑ‚",
    "Ã la mode", "NapolÃ©on", "seÃ±or", "â€”", "â€¦ and then", "Ã¡ Ã­ Ã³ Ãº", "SchÃ¶ne GrÃ¼ÃŸe",
    "Ã‰cole", "Ãœbung", "naÃ¯ve", "Ã§a va", "â‚¬100", "Â£5", "Â©2023", "Ã¦Ã¸Ã¥", "Ãƒ©",
    "ì•ˆë…•í•˜ì„¸ìš”", "Î±Î²Î³", "×©×œ×•×", "Ø§Ù„Ø¹Ø±Ø¨ÙŠØ©", "ðŸ˜€", "ðŸ±",
]
# Letters assigned after Unicode 15.0 (ICU 72 does not know them; Python's `regex` module does):
# CJK Extension I (15.1), Garay and Latin Extended-D additions (16.0); glued to letters, where
# the split differs. And letters of Unicode 15.0 (Kawi, Nag Mundari), which both know.
NEWER_UNICODE = [
    "\U0002ebf0\U0002ebf1", "\U00010d50\U00010d51\U00010d52", "cat\U0002ebf0dog", "a\U00010d50b",
    "\ua7cbx\ua7ccy", "\U00011f04\U00011f05", "x\U0001e4d0\U0001e4d1y", "k\U00011f04k",
]
WHITESPACE_ONLY = [
    "", " ", "  ", "\t", "\t \t", "\u3000", "\u00a0", "\u00a0\u00a0", " \r", "\r", "\x0b\x0c",
    "\u2003\u2009", "\u1680", "\u200b", "\ufeff", "\x00", "\x1c\x1d", "\x85", "\u2028\u2029",
]
PICKAPIC_EXTRAS = [
    "(masterpiece:1.2), ((best quality)), [ugly], {cute}", "--ar 16:9 --v 5 --q 2", "8k uhd, dslr",
    "ultra realistic, intricate details, sharp focus", "by Alphonse Mucha and Hayao Miyazaki",
    "trending on ArtStation, #art #digitalart", "https://example.com/image.png", ":) ^_^ :-D <3",
    "photo of a 25 y.o. woman", "negative: blurry, deformed, bad anatomy", "4K HDR, f/1.8, 85mm",
    "a_cat_in_a_hat", "CamelCaseWordsTogether", "ALL CAPS PROMPT", "hello...world???", "-- ** __ ~~",
    "Pokémon-style creature", "Café au lait", "Beyoncé on stage", "naïve art", "Ålesund fjord",
    "Ghibli-esque", "cyber-punk/steam-punk", "rock & roll", "A+B=C", "#1 best", "@user", "50/50",
]


def _assigned_code_points() -> list[int]:
    """Code points that Python's unicodedata knows, other than surrogates and private use."""
    return [
        cp
        for cp in range(0x110000)
        if unicodedata.category(chr(cp)) not in ("Cn", "Cs", "Co") and cp != 0x0A
    ]


def _pickapic(rng: random.Random, count: int) -> list[Caption]:
    captions = []
    for text in make_captions(rng.randrange(1 << 30), count):
        if rng.random() < 0.4:
            text += ", " + rng.choice(PICKAPIC_EXTRAS)
        if rng.random() < 0.1:
            text = text.upper()
        captions.append(Caption("pickapic", text))
    return captions


def _prompt(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(PLACES)}"


def _scripts(rng: random.Random) -> list[Caption]:
    captions = []
    for script, phrases in SCRIPTS.items():
        for phrase in phrases:
            captions.append(Caption(f"script_{script}", phrase))
            captions.append(Caption(f"script_{script}", phrase.upper()))
            captions.append(Caption(f"script_{script}", f"a {_prompt(rng)}, {phrase}, {rng.choice(STYLES)}"))
            captions.append(Caption(f"script_{script}", unicodedata.normalize("NFD", phrase)))
            words = phrase.split()
            rng.shuffle(words)
            captions.append(Caption(f"script_{script}", " ".join(words)))
            for _ in range(5):  # a word of the script inside a prompt, or glued to its words
                word = rng.choice(words)
                glue = rng.choice((" ", "", "-", ", "))
                captions.append(Caption(f"script_{script}", f"{_prompt(rng)}{glue}{word}{glue}{rng.choice(NOUNS)}"))
    return captions


def _pick(rng: random.Random, items: list[str], count: int, kind: str, joiners: tuple[str, ...]) -> list[Caption]:
    """`count` captions, each a prompt with 1-4 of `items` placed before, inside or after it."""
    captions = []
    for _ in range(count):
        parts = _prompt(rng).split()
        for _ in range(rng.randint(1, 4)):
            item = rng.choice(items)
            at = rng.randint(0, len(parts))
            glued = rng.choice(joiners)
            if glued and at < len(parts):
                parts[at] = item + parts[at]
            else:
                parts.insert(at, item)
        captions.append(Caption(kind, " ".join(parts)))
    return captions


def _every(items: list[str], kind: str) -> list[Caption]:
    """Each item alone, inside a sentence, and doubled."""
    captions = []
    for item in items:
        captions += [Caption(kind, item), Caption(kind, f"a cat {item} on a mat"), Caption(kind, item + item)]
    return captions


def _long(rng: random.Random, count: int) -> list[Caption]:
    captions = []
    for i in range(count):
        if i % 4 == 0:  # one long word (BPE on hundreds of characters)
            text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(80, 400)))
        elif i % 4 == 1:  # a long list of styles, far past 77 tokens
            text = ", ".join(rng.choice(STYLES) for _ in range(rng.randint(30, 120)))
        elif i % 4 == 2:  # many scripts in one line
            text = " ".join(rng.choice(rng.choice(list(SCRIPTS.values()))) for _ in range(rng.randint(5, 20)))
        else:  # a long line of emoji and punctuation
            text = "".join(rng.choice(EMOJI + QUOTES + ["!", "?", "...", " "]) for _ in range(rng.randint(50, 300)))
        captions.append(Caption("long", text))
    return captions


def _sweep(rng: random.Random, count: int) -> list[Caption]:
    """Random code points that Python's Unicode database knows, 12 a line."""
    code_points = _assigned_code_points()
    captions = []
    for _ in range(count):
        chars = [chr(rng.choice(code_points)) for _ in range(12)]
        captions.append(Caption("sweep", "".join(c + rng.choice(("", "", " ", "a")) for c in chars)))
    return captions


def _mixed(rng: random.Random, count: int) -> list[Caption]:
    """Fragments of every group together."""
    pools = [EMOJI, NAMED_ENTITIES, NUMERIC_ENTITIES, BROKEN_ENTITIES, QUOTES, LIGATURES, WIDTH,
             CONTROLS, COMBINING, CONTRACTIONS, NUMBERS, SPECIALS, PICKAPIC_EXTRAS]
    captions = []
    for _ in range(count):
        parts = [rng.choice(rng.choice(pools)) for _ in range(rng.randint(2, 8))]
        captions.append(Caption("mixed", rng.choice(("", " ")).join(parts)))
    return captions


def make_caption_set(seed: int = 0) -> list[Caption]:
    """The caption set: the same captions, in the same order, for a seed."""
    rng = random.Random(seed)
    captions = _pickapic(rng, 1500)
    captions += _scripts(rng)
    captions += _every(EMOJI, "emoji") + _pick(rng, EMOJI, 300, "emoji", ("", "", "x"))
    entities = NAMED_ENTITIES + NUMERIC_ENTITIES + BROKEN_ENTITIES
    captions += _every(entities, "html") + _pick(rng, entities, 300, "html", ("", "x"))
    captions += _every(QUOTES, "quotes") + _pick(rng, QUOTES, 150, "quotes", ("", "x"))
    captions += _every(LIGATURES, "ligatures") + _pick(rng, LIGATURES, 150, "ligatures", ("", "x"))
    captions += _every(WIDTH, "width") + _pick(rng, WIDTH, 100, "width", ("", "x"))
    captions += _every(CONTROLS, "controls") + _pick(rng, CONTROLS, 250, "controls", ("", "x"))
    captions += _every(COMBINING, "combining") + _pick(rng, COMBINING, 150, "combining", ("", "x"))
    captions += _every(CONTRACTIONS, "contractions") + _pick(rng, CONTRACTIONS, 150, "contractions", ("", "x"))
    captions += _every(NUMBERS, "numbers") + _pick(rng, NUMBERS, 150, "numbers", ("", "x"))
    captions += _every(SPECIALS, "special_tokens") + _pick(rng, SPECIALS, 150, "special_tokens", ("", "x"))
    captions += _every(MOJIBAKE, "mojibake")
    captions += _every(NEWER_UNICODE, "newer_unicode")
    captions += [Caption("whitespace", text) for text in WHITESPACE_ONLY]
    captions += _long(rng, 200)
    captions += _sweep(rng, 400)
    captions += _mixed(rng, 400)
    if len(captions) < MIN_CAPTIONS or any("\n" in c.text for c in captions):
        raise AssertionError(f"{len(captions)} captions (want {MIN_CAPTIONS}), none with a line break")
    return captions


def every_code_point() -> list[Caption]:
    """One line per code point that Python's `regex` module knows (private use excepted) and per
    997th other one, in five contexts: between letters, doubled, after a digit, after an
    apostrophe, last. Not part of the caption set (174k lines): docs/tokenizer.md's check of the
    split pattern over all of Unicode."""
    assigned = regex.compile(r"\p{Assigned}")
    lines = []
    for cp in range(0x110000):
        c = chr(cp)
        if 0xD800 <= cp <= 0xDFFF or cp == 0x0A:
            continue
        if (assigned.match(c) and unicodedata.category(c) != "Co") or cp % 997 == 0:
            lines.append(Caption("code_point", f"a{c}b {c}{c} 1{c}! '{c}s x{c}"))
    return lines


def write_caption_set(path: Path, captions: list[Caption], kinds: bool = False) -> None:
    lines = (f"{c.kind}\t{c.text}" if kinds else c.text for c in captions)
    path.write_bytes("".join(line + "\n" for line in lines).encode("utf-8"))


def read_captions(path: Path) -> list[str]:
    """The captions of a file written by write_caption_set (split at '\\n' only, as dde_tokenize)."""
    text = path.read_bytes().decode("utf-8")
    return text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the UTF-8 file to write, one caption per line")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", action="store_true", help='write "KIND<TAB>CAPTION" lines')
    parser.add_argument("--every-code-point", action="store_true",
                        help="write every_code_point()'s lines instead of the caption set")
    args = parser.parse_args(argv)

    def body() -> int:
        if args.out.is_dir():
            raise ToolError(args.out, "--out is a folder", "a file to write, one caption per line", "a folder",
                            "Pass a file name (e.g. captions.txt).")
        captions = every_code_point() if args.every_code_point else make_caption_set(args.seed)
        write_caption_set(args.out, captions, args.kinds)
        print(f"caption_set: {len(captions)} captions -> {args.out}")
        return 0

    return run_main("caption_set", body)


if __name__ == "__main__":
    sys.exit(main())
