/**
 * One model's tokenizer and chat template, as Transformers applies them (apply_chat_template with
 * add_generation_prompt=True: render the template with the special tokens in scope, encode without adding special
 * tokens), with message content always encoded as plain text. Built inside the tokenizer threads
 * (tokenizer-thread.ts) and in tests; the request path reaches it through TokenizerCache (tokenizer.ts).
 */
import { Template } from '@huggingface/jinja';
import { Tokenizer } from '@huggingface/tokenizers';
import { ApiError } from '../errors';
import type { JobMessage } from '../protocol/job';

type Json = Record<string, unknown>;

const SPECIAL_TOKEN_KEYS = ['bos_token', 'eos_token', 'unk_token', 'pad_token', 'sep_token', 'cls_token', 'mask_token'];

/** tokenizer_config.json may spell a special token as "<s>" or as an AddedToken object {"content": "<s>", …}. */
function tokenText(v: unknown): string | undefined {
  if (typeof v === 'string') return v;
  if (v && typeof v === 'object' && typeof (v as Json).content === 'string') return (v as Json).content as string;
  return undefined;
}

/** The template: a separate string (Transformers 5 saves chat_template.jinja) or tokenizer_config's own field. */
export function pickChatTemplate(config: Json, separate?: string | null): string | null {
  if (separate) return separate;
  const t = config.chat_template;
  if (typeof t === 'string') return t;
  if (Array.isArray(t)) {
    // Named templates: [{name, template}]; Transformers uses "default".
    const named = t as Array<{ name?: string; template?: string }>;
    return (named.find((x) => x.name === 'default') ?? named[0])?.template ?? null;
  }
  return null;
}

/**
 * Message content is always text: a `<|im_start|>` typed by a user must not become the control token, or the user could
 * forge system or assistant turns. The template is rendered with each content replaced by a marker (a per-render nonce,
 * so content cannot fake one); the template's own text is encoded with special tokens recognised, each content with a
 * second tokenizer that does not know the special tokens (as Transformers' `split_special_tokens=True`). The worker
 * does the same (worker-py model.py chat_prompt_ids), so both count the same ids.
 */
const MARK_OPEN = '\uE000';
const MARK_CLOSE = '\uE001';

export class ModelTokenizer {
  private readonly tokenizer: Tokenizer;
  /** The same tokenizer with no special added tokens: their text is split like any other text. */
  private readonly plain: Tokenizer;
  private readonly template: Template;
  private readonly specials: Record<string, unknown>;
  private readonly specialTexts: string[];
  private readonly specialIds: Set<number>;
  readonly vocabSize: number;
  /**
   * The most characters one token can stand for (the longest vocabulary entry: byte-level entries have one character
   * per byte, and a JS string has at most one UTF-16 unit per byte of UTF-8). A prompt with more content characters
   * than contextLength × this cannot fit the context, whatever it is: refused before it is tokenized.
   */
  readonly maxTokenChars: number;

  constructor(tokenizerJson: Json, config: Json, chatTemplate: string | null) {
    if (!chatTemplate) throw new Error('the tokenizer has no chat template');
    this.tokenizer = new Tokenizer(tokenizerJson, config);
    const added = Array.isArray(tokenizerJson.added_tokens) ? (tokenizerJson.added_tokens as Json[]) : [];
    this.plain = new Tokenizer({ ...tokenizerJson, added_tokens: added.filter((t) => t.special !== true) }, config);
    const special = added.filter((t) => t.special === true && typeof t.content === 'string');
    this.specialTexts = special.map((t) => t.content as string);
    this.specialIds = new Set(special.map((t) => Number(t.id)));
    this.template = new Template(chatTemplate);
    this.specials = {};
    for (const key of SPECIAL_TOKEN_KEYS) {
      const text = tokenText(config[key]);
      if (text !== undefined) this.specials[key] = text;
    }
    if (Array.isArray(config.additional_special_tokens)) {
      this.specials.additional_special_tokens = config.additional_special_tokens.map(tokenText);
    }
    const vocab = this.tokenizer.get_vocab(true);
    this.vocabSize = vocab.size;
    let longest = 1;
    for (const token of vocab.keys()) if (token.length > longest) longest = token.length;
    this.maxTokenChars = longest;
  }

  render(messages: readonly JobMessage[]): string {
    try {
      return this.template.render({
        ...this.specials,
        messages,
        add_generation_prompt: true,
        // raise_exception is a built-in of @huggingface/jinja, as it is of Transformers.
      });
    } catch (err) {
      // Templates reject some conversations on purpose (e.g. roles that do not alternate): that is the client's 400.
      const message = err instanceof Error ? err.message : String(err);
      throw new ApiError('invalid_request', `The model's chat template rejected these messages: ${message}`, {
        param: 'messages',
      });
    }
  }

  /** The prompt's token ids, content encoded as plain text (see MARK_OPEN above). */
  promptIds(messages: readonly JobMessage[]): number[] {
    return this.promptPieces(messages).flat();
  }

  countPrompt(messages: readonly JobMessage[]): number {
    return this.promptPieces(messages).reduce((n, ids) => n + ids.length, 0);
  }

  /**
   * A raw prompt's ids (/v1/completions: no template). The text is plain text, as message content is (a typed
   * `<|endoftext|>` stays those characters), with the tokens the tokenizer itself adds around a text (a BOS where its
   * post-processor adds one), as Transformers' `tokenizer(prompt)` does: the worker's model.raw_prompt_ids.
   */
  textIds(text: string): number[] {
    return this.plain.encode(text, { add_special_tokens: true }).ids;
  }

  /** The prompt's ids piece by piece (no spreading: a huge prompt's pieces exceed the call stack's argument limit). */
  private promptPieces(messages: readonly JobMessage[]): number[][] {
    const rendered = this.render(messages);
    const { spans, withMarks } = this.contentSpans(messages, rendered);
    if (spans !== null) return spans.map((s) => (s.content ? this.plain : this.tokenizer).encode(s.text, { add_special_tokens: false }).ids);
    // The template transforms content beyond what markers survive (slicing, replacing …), so content cannot be encoded
    // apart: the real rendering is encoded whole, unless it holds more control tokens than the template alone puts
    // there (content that spells one, even assembled by the template's own edits): then refuse rather than forge turns.
    const ids = this.encode(rendered);
    const forged =
      withMarks !== null
        ? this.countSpecial(ids) > this.countSpecial(this.encode(withMarks))
        : messages.some((m) => this.specialTexts.some((t) => m.content.includes(t)));
    if (forged) {
      throw new ApiError(
        'invalid_request',
        "A message contains the text of one of the model's control tokens, which this model's chat template cannot carry as plain text.",
        { param: 'messages' },
      );
    }
    return [ids];
  }

  private countSpecial(ids: number[]): number {
    let n = 0;
    for (const id of ids) if (this.specialIds.has(id)) n++;
    return n;
  }

  encode(text: string): number[] {
    return this.tokenizer.encode(text, { add_special_tokens: false }).ids;
  }

  /**
   * The rendering cut into template text and content text, or null when the template does not carry each content
   * through unchanged (or trimmed). The pieces always join to exactly the real rendering.
   */
  private contentSpans(
    messages: readonly JobMessage[],
    rendered: string,
  ): { spans: Array<{ text: string; content: boolean }> | null; withMarks: string | null } {
    const nonce = Math.random().toString(36).slice(2, 10);
    const mark = (i: number) => `${MARK_OPEN}${nonce}:${i}${MARK_CLOSE}`;
    const masked = messages.map((m, i) => (m.content.length > 0 ? { ...m, content: mark(i) } : m));
    let withMarks: string;
    try {
      withMarks = this.render(masked);
    } catch {
      return { spans: null, withMarks: null }; // the template looked at the content itself
    }
    const re = new RegExp(`${MARK_OPEN}${nonce}:(\\d+)${MARK_CLOSE}`, 'g');
    const spans: Array<{ text: string; content: boolean }> = [];
    let last = 0;
    for (const m of withMarks.matchAll(re)) {
      spans.push({ text: withMarks.slice(last, m.index), content: false });
      spans.push({ text: messages[Number(m[1])].content, content: true });
      last = m.index! + m[0].length;
    }
    spans.push({ text: withMarks.slice(last), content: false });
    if (spans.some((s) => !s.content && s.text.includes(MARK_OPEN + nonce))) return { spans: null, withMarks };
    if (spans.map((s) => s.text).join('') === rendered) return { spans: spans.filter((s) => s.text.length > 0), withMarks };
    // Templates that trim content (Llama 3's `| trim`): the same with trimmed content.
    for (const s of spans) if (s.content) s.text = s.text.trim();
    if (spans.map((s) => s.text).join('') === rendered) return { spans: spans.filter((s) => s.text.length > 0), withMarks };
    return { spans: null, withMarks };
  }
}
