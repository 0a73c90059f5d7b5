"""Conversations -> token ids and a loss mask, through a Jinja chat template (Hugging Face's format).

`render(messages)` gives `(token_ids, loss_mask)`: `loss_mask[i]` is 1 when token i is a scored
target. The default template is ChatML with Arcade100k's own special tokens,

    <|im_start|>ROLE\\nCONTENT<|im_end|>\\n

and `data.chat_template` may name any other Jinja string written for `apply_chat_template`.

Which tokens are scored (`loss_on="assistant"`): those of each assistant turn after the generation
prompt, through the turn's end marker, i.e. CONTENT and `<|im_end|>` in ChatML. How that is found
for any template: render the conversation prefix by prefix. Turn i's scored text starts where
`render(messages[:i], add_generation_prompt=True)` ends and stops where `render(messages[:i+1])`
ends, less the whitespace the template writes after its end marker (the model stops at the marker,
so the newline after it is never generated). A token is scored when it overlaps that text (a
token may straddle the boundary, e.g. the header's newline merged with a content that starts with
one). This needs nothing from the template (no `{% generation %}` tags, which other engines do not
parse) except that a rendering of a prefix is a prefix of the rendering; `check_template` verifies
that once at start-up and every render checks it again.

Message contents are text: a special-token string inside a content (`"<|im_end|>"` pasted into a
prompt) is encoded as plain text, never as the control token, so data cannot forge turn boundaries,
and only the template's own markers are special ids. This is exactly Hugging Face's
`apply_chat_template(..., sanitize_control_tokens=True)`: each special-token string in a content is
encoded on its own, as text, and the rest of the rendering as one string in which the template's
special-token strings are special ids. Without special-token strings in contents (the usual case),
the plain `apply_chat_template(messages)` of the exported tokenizer gives the same ids.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import unicodedata
from typing import Any, Optional, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np

from ar_lm_jax.errors import UserError
from ar_lm_jax.tokenizer import SPECIAL_TOKENS, Arcade100k, load_tokenizer

ROLES = ("system", "user", "assistant")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# ChatML, written as Hugging Face templates are (the exported tokenizer_config.json holds this string).
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Skip reasons of chat records (counted as data/skipped_<reason>, see data_sources).
SKIP_REASONS = ("no_messages", "unknown_role", "no_assistant_turn", "empty_content", "non_string_content",
                "template_error")
# Hugging Face's markers around special-token strings of user input (transformers.utils.chat_template_utils).
_MARK_START, _MARK_END = "\U000f0000", "\U000f0001"


class ChatError(UserError):
  """A conversation that cannot be rendered; `reason` is one of SKIP_REASONS."""

  def __init__(self, reason: str, message: str = ""):
    super().__init__(message or reason)
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class Rendered:
  tokens: np.ndarray  # int32 [n]
  loss_mask: np.ndarray  # uint8 [n]: 1 = token i is a scored target


# ---------------------------------------------------------------------------
# Records -> messages.


def messages_of(record: Any) -> list[dict[str, str]]:
  """The validated messages of a JSONL record: `{"messages": [...]}` or `{"prompt", "response"[, "system"]}`."""
  if not isinstance(record, dict):
    raise ChatError("no_messages")
  if "messages" in record:
    messages = record["messages"]
  elif "prompt" in record or "response" in record:
    messages = [{"role": "user", "content": record.get("prompt")},
                {"role": "assistant", "content": record.get("response")}]
    if record.get("system") is not None:
      messages.insert(0, {"role": "system", "content": record["system"]})
  else:
    raise ChatError("no_messages")
  return validate(messages)


def validate(messages: Any) -> list[dict[str, str]]:
  """`messages` as `[{"role", "content"}]` (NFC contents), or ChatError naming the first problem."""
  if not isinstance(messages, (list, tuple)) or not messages:
    raise ChatError("no_messages")
  out = []
  for m in messages:
    if not isinstance(m, dict) or m.get("role") not in ROLES:
      raise ChatError("unknown_role", f"unknown role {m.get('role') if isinstance(m, dict) else m!r}")
    content = m.get("content")
    if not isinstance(content, str):
      raise ChatError("non_string_content")
    if not content.strip():
      raise ChatError("empty_content")
    try:
      content.encode("utf-8")  # JSON escapes can smuggle in lone surrogates
    except UnicodeEncodeError:
      raise ChatError("non_string_content", "content is not valid Unicode") from None
    out.append({"role": m["role"], "content": unicodedata.normalize("NFC", content)})
  if not any(m["role"] == "assistant" for m in out):
    raise ChatError("no_assistant_turn")
  return out


# ---------------------------------------------------------------------------
# Templates.


class _Generation(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}` (Hugging Face's assistant-mask tags) renders its body unchanged."""
  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

  def _body(self, caller):
    return caller()


def _raise(message):
  raise jinja2.exceptions.TemplateError(message)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
  # The environment Hugging Face renders chat templates in (trim_blocks, lstrip_blocks, loop controls, sandbox).
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                      extensions=[_Generation, jinja2.ext.loopcontrols])
  env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: __import__("json").dumps(
      x, indent=indent, ensure_ascii=ensure_ascii)
  env.globals["raise_exception"] = _raise
  return env.from_string(template)


def _render_text(template: str, messages: Sequence[dict], add_generation_prompt: bool, tok: Arcade100k) -> str:
  eos = tok.eos_token  # Hugging Face passes the special tokens map; ours is <|endoftext|> for all four
  return _compile(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                   bos_token=eos, eos_token=eos, pad_token=eos, unk_token=eos)


# Any special-token string, longest first (so a token wins over one it contains).
_SPECIAL = re.compile("|".join(re.escape(s) for s in sorted(SPECIAL_TOKENS, key=len, reverse=True)))
_MARKED = re.compile(re.escape(_MARK_START) + "(.*?)" + re.escape(_MARK_END), re.S)


def _mark(content: str) -> str:
  content = content.replace(_MARK_START, "").replace(_MARK_END, "")  # markers in data cannot forge marked tokens
  return _SPECIAL.sub(lambda m: _MARK_START + m.group(0) + _MARK_END, content)


def _tokenize(text: str, tok: Arcade100k) -> tuple[list[int], list[int], list[int]]:
  """Ids of a rendering with marked contents, and the character offsets where each token starts and ends."""
  ids: list[int] = []
  starts: list[int] = []
  ends: list[int] = []

  def text_ids(piece: str, at: int) -> None:
    if not piece:
      return
    assert unicodedata.normalize("NFC", piece) == piece, "contents are NFC-normalized before rendering"
    piece_ids = tok.encoding.encode_ordinary(piece)
    _, offsets = tok.encoding.decode_with_offsets(piece_ids)
    ids.extend(piece_ids)
    starts.extend(at + o for o in offsets)
    ends.extend([at + o for o in offsets[1:]] + [at + len(piece)])

  def plain_ids(piece: str, at: int) -> None:
    """Template text: its special-token strings are special ids, the rest text."""
    pos = 0
    for m in _SPECIAL.finditer(piece):
      text_ids(piece[pos:m.start()], at + pos)
      ids.append(tok.special_tokens[m.group(0)])
      starts.append(at + m.start())
      ends.append(at + m.end())
      pos = m.end()
    text_ids(piece[pos:], at + pos)

  pos = 0
  for m in _MARKED.finditer(text):
    plain_ids(text[pos:m.start()], pos)
    text_ids(m.group(1), m.start(1))  # a special-token string of a content: text, on its own
    pos = m.end()
  plain_ids(text[pos:], pos)
  return ids, starts, ends


def render(messages: Sequence[dict], template: Optional[str] = None, *, loss_on: str = "assistant",
           add_generation_prompt: bool = False, tokenizer: Optional[Arcade100k] = None) -> tuple[np.ndarray, np.ndarray]:
  """(token ids int32 [n], loss mask uint8 [n]) of a conversation; raises ChatError for bad input.

  `template`: a Jinja chat template ("" or None: ChatML). `loss_on`: "assistant" scores the
  assistant turns (content and end marker), "all" every token.
  """
  r = render_conversation(messages, template, loss_on=loss_on, add_generation_prompt=add_generation_prompt,
                          tokenizer=tokenizer)
  return r.tokens, r.loss_mask


def render_conversation(messages: Sequence[dict], template: Optional[str] = None, *, loss_on: str = "assistant",
                        add_generation_prompt: bool = False, tokenizer: Optional[Arcade100k] = None) -> Rendered:
  tok = tokenizer or load_tokenizer()
  template = template or CHATML
  msgs = validate(messages) if not add_generation_prompt else _validate_prompt(messages)
  marked = [{"role": m["role"], "content": _mark(m["content"])} for m in msgs]
  try:
    text = _render_text(template, marked, add_generation_prompt, tok)
    spans = []
    if loss_on == "assistant":
      for i, m in enumerate(marked):
        if m["role"] != "assistant":
          continue
        before = _render_text(template, marked[:i], True, tok)
        through = _render_text(template, marked[:i + 1], False, tok).rstrip()
        if not (text.startswith(before) and text.startswith(through) and len(before) < len(through)):
          raise ChatError("template_error", "the chat template does not render a conversation's prefixes as "
                          "prefixes of its rendering, so the assistant turns cannot be located")
        spans.append((len(before), len(through)))
  except jinja2.exceptions.TemplateError as e:
    raise ChatError("template_error", f"chat template: {e}") from None
  ids, starts, ends = _tokenize(text, tok)
  starts_N, ends_N = np.asarray(starts, np.int64), np.asarray(ends, np.int64)
  mask = np.full(len(ids), loss_on == "all", np.uint8)
  for a, b in spans:
    mask[(starts_N < b) & (ends_N > a)] = 1
  return Rendered(np.asarray(ids, np.int32), mask)


def _validate_prompt(messages: Sequence[dict]) -> list[dict[str, str]]:
  """A prompt for generation needs no assistant turn."""
  try:
    return validate(messages)
  except ChatError as e:
    if e.reason != "no_assistant_turn":
      raise
  return validate(list(messages) + [{"role": "assistant", "content": "x"}])[:-1]


def check_template(template: str, tokenizer: Optional[Arcade100k] = None) -> None:
  """Raises ChatError when `template` cannot be used for training (a ConfigError at start-up)."""
  probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"},
           {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}]
  _, mask = render(probe, template, tokenizer=tokenizer)
  if not mask.any():
    raise ChatError("template_error", "the chat template scores no token of a sample conversation")


# ---------------------------------------------------------------------------
# Hugging Face export.


def trains_on_chat(data_cfg) -> bool:
  """Whether a run's data (a DataConfig) reads conversations, i.e. whether its exports get a chat template."""
  return any(s.format == "chat" for s in (*data_cfg.sources, *data_cfg.eval_sources))


def _update_json(path: str, update: dict) -> None:
  import json  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  with open(path, encoding="utf-8") as f:
    obj = json.load(f)
  obj.update(update)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:  # written whole, then renamed: never half a file
    json.dump(obj, f, ensure_ascii=False, indent=2)
    f.write("\n")
  os.replace(tmp, path)


def write_hf_chat_files(out_dir: str, template: str = "") -> None:
  """Adds the chat template to an export's tokenizer_config.json, and <|im_end|> to generation_config.json's stops.

  `split_special_tokens` is turned off in a chat export: with it, the tokenizer would encode the
  template's own <|im_start|>/<|im_end|> as text and `apply_chat_template` could not produce a
  single marker. Special-token strings inside contents are still text in `render`, as in
  `apply_chat_template(..., sanitize_control_tokens=True)` (module docstring).
  """
  import os  # pylint: disable=import-outside-toplevel
  from ar_lm_jax.tokenizer import EOS_ID  # pylint: disable=import-outside-toplevel
  _update_json(os.path.join(out_dir, "tokenizer_config.json"),
               {"chat_template": template or CHATML, "split_special_tokens": False})
  gen = os.path.join(out_dir, "generation_config.json")
  if os.path.isfile(gen):
    _update_json(gen, {"eos_token_id": [load_tokenizer().special_tokens[IM_END], EOS_ID]})
