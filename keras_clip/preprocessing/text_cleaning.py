"""Text cleaning of OpenAI CLIP's tokenizer, and the one definition of blank text.

`clean_text` is the reference's host-side cleaning (ftfy, HTML unescaping);
`TextCleaning` is its in-graph approximation that `CLIPTokenizer(fix_text=True)`
runs. Whitespace is what Python's `str.isspace` (and so `str.split`/`str.strip`)
calls whitespace, as the reference's `whitespace_clean` sees it; `is_blank` (a
Python string) and `blank_mask` (a `tf.string` tensor) use that one rule, so the
input pipeline, shard conversion, the tokenizer and exports agree on which texts
are empty.
"""
import functools
import html
import html.entities

import tensorflow as tf
import tensorflow_text as tf_text

from keras_clip.preprocessing._tensors import _ragged_from_flat, _replace_rows, _static_table

# Text for which every cleaning step except whitespace and case is a no-op:
# printable ASCII and ASCII whitespace without `&` (no HTML entities).
_PLAIN_ASCII_PATTERN = r"[\t\n\f\r\x20-\x25\x27-\x7e]*"
_ASCII_PATTERN = r"[\x00-\x7f]*"

# ftfy.fixes.remove_terminal_escapes (ftfy's `\d` is Unicode, hence \p{Nd}).
_ANSI_ESCAPE_PATTERN = r"\x1b\[[\p{Nd};]*[a-zA-Z]"
# ftfy.fixes.remove_control_chars (ftfy.chardata.CONTROL_CHARS).
_CONTROL_CHARS_PATTERN = (
    r"[\x00-\x08\x0b\x0e-\x1f\x7f\x{206a}-\x{206f}\x{feff}\x{fff9}-\x{fffc}]"
)
# ftfy.chardata.HTML_ENTITY_RE: the entities ftfy decodes (semicolon required).
_FTFY_ENTITY_PATTERN = r"&#?[0-9A-Za-z]{1,24};"
# html.unescape's pattern (semicolon optional).
_HTML_ENTITY_PATTERN = r"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)"
_NUMERIC_ENTITY_PATTERN = r"&#([0-9]+|[xX][0-9a-fA-F]+);?"
_NUMERIC_ENTITY_STRICT_PATTERN = r"&#([0-9]+|[xX][0-9a-fA-F]+);"
_REPLACEMENT_CHARACTER = "\ufffd"


@functools.lru_cache(maxsize=1)
def whitespace_class():
    """RE2 character class of the characters Python's `str.isspace` is true for."""
    chars = [c for c in range(0x110000) if chr(c).isspace()]
    return "[" + "".join(f"\\x{{{c:x}}}" for c in chars) + "]"


def is_blank(text):
    """Whether the Python string `text` is empty or only whitespace (`str.isspace`).

    Example:

    >>> is_blank("\u3000\u00a0 "), is_blank(" a ")
    (True, False)
    """
    return not text.strip()  # str.strip removes exactly the str.isspace characters


def blank_mask(texts):
    """`is_blank` in the graph: tf.bool of the shape of the `tf.string` tensor `texts`."""
    return tf.strings.regex_full_match(texts, whitespace_class() + "*")


def clean_text(text):
    """Host-side cleaning of the reference: `ftfy.fix_text`, HTML-unescape twice, strip.

    This is OpenAI's `basic_clean`. Whitespace collapsing and lowercasing are
    left to `CLIPTokenizer`, which does them in the graph exactly as the
    reference does.

    Args:
        text: a Python `str`.

    Returns:
        The cleaned `str`.
    """
    import ftfy  # Not needed to run the layer or a SavedModel that holds it.

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return text.strip()


def _python_whitespace_class():
    """RE2 class of the characters Python's `str.split()` treats as whitespace."""
    return whitespace_class() + "+"


def _fixed_point(fn, text):
    while True:
        fixed = fn(text)
        if fixed == text:
            return text
        text = fixed


def _ftfy_character_map():
    """Single-character fixes of `ftfy.fix_text`, composed to their fixed point.

    Covers C1 controls read as Windows-1252, Latin ligatures, half/fullwidth
    forms (and U+3000), curly quotes and line-break characters: the fixes that
    `ftfy` applies character by character. Control-character removal and
    terminal escapes are separate regexes because they must run after these.
    """
    from ftfy import chardata, fixes

    def chain(text):
        for fix in (
            fixes.fix_c1_controls,
            fixes.fix_latin_ligatures,
            fixes.fix_character_width,
            fixes.uncurl_quotes,
            fixes.fix_line_breaks,
        ):
            text = fix(text)
        return text

    candidates = set(range(0x80, 0xA0))
    candidates |= set(chardata.LIGATURES) | set(chardata.WIDTH_MAP)
    candidates |= {0x02BC, 0x2028, 0x2029, 0x0D} | set(range(0x2018, 0x2020))
    mapping = {}
    for code in sorted(candidates):
        fixed = _fixed_point(chain, chr(code))
        if fixed != chr(code):
            mapping[chr(code)] = fixed
    return mapping


def _python_lowercase_map():
    """Python's `str.lower` for the non-ASCII characters it changes.

    `tf.strings.lower` uses ICU, whose Unicode tables can be older than
    Python's; re-applying Python's per-character mapping afterwards fixes the
    characters ICU leaves unchanged, and is a no-op on everything ICU lowered.
    """
    mapping = {}
    for code in range(0x80, 0x1F000):
        if 0xD800 <= code <= 0xDFFF:
            continue
        char = chr(code)
        lower = char.lower()
        if lower != char:
            mapping[char] = lower
    return mapping


def _numeric_reference_specials():
    """`html.unescape` results for code points it does not turn into `chr(n)`."""
    codes = list(range(0x00, 0xA0)) + list(range(0xFDD0, 0xFDF0))
    codes += [plane * 0x10000 + low for plane in range(17) for low in (0xFFFE, 0xFFFF)]
    specials = {}
    for code in codes:
        text = html.unescape(f"&#{code};")
        if text != chr(code):
            specials[code] = text
    return specials


class TextCleaning:
    """The in-graph cleaning half of `CLIPTokenizer` (`fix_text=True`).

    A mixin: `_build_cleaning_tables` creates the tables as attributes of the
    layer, so SavedModels carry them as resources.
    """

    def _build_cleaning_tables(self):
        from ftfy import chardata

        characters = _ftfy_character_map()
        self._ftfy_characters = _static_table(
            list(characters), list(characters.values()), tf.string, tf.string, "",
            "ftfy_characters",
        )
        ftfy_entities = chardata.HTML_ENTITIES  # "&name;" -> text
        self._ftfy_entities = _static_table(
            list(ftfy_entities), list(ftfy_entities.values()), tf.string, tf.string,
            "", "ftfy_entities",
        )
        html5 = html.entities.html5  # "name;" or legacy "name" -> text
        self._html_entities = _static_table(
            ["&" + name for name in html5], list(html5.values()), tf.string,
            tf.string, "", "html_entities",
        )
        # Legacy names (no `;`) that html.unescape also finds as a prefix; the
        # longest one wins, so list them longest first for RE2's leftmost-first
        # alternation.
        legacy = sorted((n for n in html5 if not n.endswith(";")), key=len, reverse=True)
        self._legacy_entity_pattern = "^&(" + "|".join(legacy) + ")(.+)$"
        specials = _numeric_reference_specials()
        self._numeric_specials = _static_table(
            list(specials), list(specials.values()), tf.int64, tf.string, "\x00",
            "numeric_reference_specials",
        )

    # ------------------------------------------------------------- cleaning

    def _map_characters(self, texts, table):
        """Replaces each character found in `table` (char -> text) in `texts` `(S,)`."""
        chars = tf.strings.unicode_split(texts, "UTF-8")  # (S, (C))
        mapped = table.lookup(chars.flat_values)
        flat = tf.where(tf.equal(mapped, ""), chars.flat_values, mapped)
        return tf.strings.reduce_join(_ragged_from_flat(flat, chars), axis=1)

    def _fix_text(self, texts):
        """In-graph approximation of `clean_text` on strings `(S,)`."""
        # tensorflow-text's regex ops stop at NUL. ftfy deletes NUL together with
        # U+FFFC (remove_control_chars), and U+FFFC is inert in every step before
        # that, so it is a faithful stand-in.
        texts = tf.strings.regex_replace(texts, r"\x00", "\ufffc")
        # ftfy fixes each line separately and stops decoding HTML from the first
        # line that contains "<".
        lines = tf_text.regex_split(texts, r"\n", r"\n")  # (S, (G))
        has_markup = tf.cast(tf.strings.regex_full_match(lines.flat_values, "(?s).*<.*"), tf.int32)
        markup_so_far = tf.cumsum(has_markup)
        before_row = tf.gather(
            tf.concat([[0], markup_so_far], axis=0), lines.row_starts()
        )
        unescape = tf.equal(
            markup_so_far - tf.gather(before_row, lines.value_rowids()), 0
        )  # (G_total,)

        def ftfy_step(segments):
            decoded = self._replace_entities(segments, _FTFY_ENTITY_PATTERN, ftfy=True)
            segments = tf.where(unescape, decoded, segments)
            segments = self._map_characters(segments, self._ftfy_characters)
            segments = tf.strings.regex_replace(segments, _ANSI_ESCAPE_PATTERN, "")
            segments = tf.strings.regex_replace(segments, _CONTROL_CHARS_PATTERN, "")
            return tf_text.normalize_utf8(segments, "NFC")

        def body(segments, _):
            fixed = ftfy_step(segments)
            return fixed, tf.reduce_any(tf.not_equal(fixed, segments))

        segments, _ = tf.while_loop(
            lambda segments, changed: changed,
            body,
            (lines.flat_values, tf.constant(True)),
        )
        for _ in range(2):  # html.unescape(html.unescape(text))
            segments = self._replace_entities(segments, _HTML_ENTITY_PATTERN, ftfy=False)
        return tf.strings.reduce_join(_ragged_from_flat(segments, lines), axis=1)

    def _replace_entities(self, texts, pattern, ftfy):
        """Decodes HTML character references in `texts` `(S,)`.

        `ftfy=True` follows `ftfy.fixes.unescape_html` (`;` required, ftfy's
        upper-case names); `ftfy=False` follows `html.unescape`.
        """
        has_entity = tf.strings.regex_full_match(texts, "(?s).*&.*")

        def decode(texts):
            pieces = tf_text.regex_split(texts, pattern, pattern)  # (S, (P))
            flat = pieces.flat_values
            is_entity = tf.strings.regex_full_match(flat, pattern)
            numeric_pattern = (
                _NUMERIC_ENTITY_STRICT_PATTERN if ftfy else _NUMERIC_ENTITY_PATTERN
            )
            is_numeric = tf.strings.regex_full_match(flat, numeric_pattern)
            numeric = self._decode_numeric_references(flat)
            if ftfy:
                named = self._ftfy_entities.lookup(flat)
                # ftfy keeps a reference whose decoded text contains ";".
                numeric = tf.where(
                    tf.strings.regex_full_match(numeric, "(?s).*;.*"), flat, numeric
                )
            else:
                named = self._html_entities.lookup(flat)
                # Otherwise the longest legacy name (no ";") that is a prefix.
                is_legacy = tf.strings.regex_full_match(flat, self._legacy_entity_pattern)
                name = tf.strings.regex_replace(flat, self._legacy_entity_pattern, r"&\1")
                rest = tf.strings.regex_replace(flat, self._legacy_entity_pattern, r"\2")
                legacy = tf.strings.join([self._html_entities.lookup(name), rest])
                named = tf.where(
                    tf.logical_and(tf.equal(named, ""), is_legacy), legacy, named
                )
            # No entity decodes to "", so "" marks "not found": keep the text.
            named = tf.where(tf.equal(named, ""), flat, named)
            decoded = tf.where(is_numeric, numeric, named)
            flat = tf.where(is_entity, decoded, flat)
            return tf.strings.reduce_join(_ragged_from_flat(flat, pieces), axis=1)

        return _replace_rows(texts, has_entity, decode)

    def _decode_numeric_references(self, references):
        """`&#NN;` / `&#xNN;` (`;` optional) -> text, with `html.unescape`'s rules.

        Entries that are not numeric references give unspecified text.
        """
        digits = tf.strings.regex_replace(
            references, r"^&#[xX]?0*([0-9a-fA-F]*);?$", r"\1"
        )
        is_hex = tf.strings.regex_full_match(references, "&#[xX].*")
        codes = tf.strings.unicode_decode(digits, "UTF-8")  # (R, (D))
        values = tf.cast(codes.flat_values, tf.int64)
        values = tf.where(
            values >= ord("a"), values - ord("a") + 10,
            tf.where(values >= ord("A"), values - ord("A") + 10, values - ord("0")),
        )
        base = tf.where(is_hex, tf.constant(16, tf.int64), tf.constant(10, tf.int64))
        num_digits = codes.row_lengths()
        # Seven significant digits or fewer fit comfortably in int64; longer
        # numbers are beyond U+10FFFF in either base.
        too_long = num_digits > 7
        position = tf.cast(codes.value_rowids(), tf.int64)
        index_in_row = tf.range(tf.size(values, out_type=tf.int64)) - tf.gather(
            codes.row_starts(), position
        )
        exponent = tf.gather(num_digits, position) - 1 - index_in_row
        exponent = tf.minimum(exponent, 7)
        weights = tf.cast(
            tf.pow(tf.cast(tf.gather(base, position), tf.float64), tf.cast(exponent, tf.float64)),
            tf.int64,
        )
        value = tf.math.unsorted_segment_sum(
            values * weights, position, tf.shape(references, out_type=tf.int64)[0]
        )  # (R,)
        invalid = (
            too_long
            | (value < 0)  # Only for entries that are not numeric references.
            | (value > 0x10FFFF)
            | ((value >= 0xD800) & (value <= 0xDFFF))
        )
        code_points = tf.cast(tf.where(invalid, tf.zeros_like(value), value), tf.int32)
        text = tf.strings.unicode_encode(tf.expand_dims(code_points, 1), "UTF-8")
        special = self._numeric_specials.lookup(tf.where(invalid, -tf.ones_like(value), value))
        text = tf.where(tf.equal(special, "\x00"), text, special)
        return tf.where(invalid, _REPLACEMENT_CHARACTER, text)
