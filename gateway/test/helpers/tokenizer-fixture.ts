/** The SmolLM2-135M-Instruct tokenizer as a worker exports it (see fixtures/tokenizer/make_fixture.py). */
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { gunzipSync } from 'node:zlib';
import type { JobMessage } from '../../src/protocol/job';

const DIR = join(__dirname, '..', 'fixtures', 'tokenizer', 'smollm2-135m-instruct');

export interface TokenizerFixture {
  tokenizerJson: string;
  /** tokenizer_config.json without the template (Transformers 5 layout: the template is a separate file). */
  configJson: string;
  chatTemplate: string;
  /** tokenizer_config.json with chat_template folded in (the layout docs/PROTOCOL.md asks workers for). */
  configWithTemplateJson: string;
  hash: string;
  vocabSize: number;
  cases: Array<{ messages: JobMessage[]; rendered: string; rendered_ids: number[]; ids: number[]; count: number }>;
  /** Raw prompts (/v1/completions) and the worker's ids for them. */
  prompts: Array<{ text: string; ids: number[] }>;
}

let cached: TokenizerFixture | null = null;

export function tokenizerFixture(): TokenizerFixture {
  if (cached) return cached;
  const tokenizerJson = gunzipSync(readFileSync(join(DIR, 'tokenizer.json.gz'))).toString('utf8');
  const configJson = readFileSync(join(DIR, 'tokenizer_config.json'), 'utf8');
  const chatTemplate = readFileSync(join(DIR, 'chat_template.jinja'), 'utf8');
  const configWithTemplateJson = JSON.stringify({ ...JSON.parse(configJson), chat_template: chatTemplate });
  const meta = JSON.parse(readFileSync(join(DIR, 'cases.json'), 'utf8'));
  const hash = createHash('sha256').update(tokenizerJson + configWithTemplateJson).digest('hex');
  cached = { tokenizerJson, configJson, chatTemplate, configWithTemplateJson, hash, vocabSize: meta.vocab_size, cases: meta.cases, prompts: meta.prompts };
  return cached;
}
