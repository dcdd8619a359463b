/**
 * Prompt counting in the gateway must equal Transformers' count (the worker reports that one in `usage`): the
 * expected ids in the fixture come from Python (fixtures/tokenizer/make_fixture.py).
 */
import { ApiError } from '../src/errors';
import { silentLogger } from '../src/logger';
import { tokenizerKey } from '../src/protocol/job';
import { ModelTokenizer, pickChatTemplate, TokenizerCache } from '../src/services/tokenizer';
import { useTestRedis } from './helpers/redis-server';
import { tokenizerFixture } from './helpers/tokenizer-fixture';

describe('ModelTokenizer against Transformers', () => {
  const fx = tokenizerFixture();
  const tok = new ModelTokenizer(JSON.parse(fx.tokenizerJson), JSON.parse(fx.configJson), fx.chatTemplate);

  it.each(fx.cases.map((c, i) => [i, c] as const))('case %i: same rendering, same ids, same count', (_i, c) => {
    expect(tok.render(c.messages)).toBe(c.rendered);
    expect(tok.encode(c.rendered)).toEqual(c.ids);
    expect(tok.countPrompt(c.messages)).toBe(c.count);
  });

  it('knows its vocabulary size', () => {
    expect(tok.vocabSize).toBe(fx.vocabSize);
  });

  it('finds the template in tokenizer_config.json or in a separate field', () => {
    const inConfig = JSON.parse(fx.configWithTemplateJson);
    expect(pickChatTemplate(inConfig)).toBe(fx.chatTemplate);
    expect(pickChatTemplate(JSON.parse(fx.configJson), fx.chatTemplate)).toBe(fx.chatTemplate);
    expect(pickChatTemplate({ chat_template: [{ name: 'tool_use', template: 'x' }, { name: 'default', template: 'd' }] })).toBe('d');
    expect(pickChatTemplate({})).toBeNull();
  });

  it('turns a template that raises into a 400 naming messages', () => {
    const strict = new ModelTokenizer(
      JSON.parse(fx.tokenizerJson),
      JSON.parse(fx.configJson),
      "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}x",
    );
    expect(() => strict.countPrompt([{ role: 'assistant', content: 'a' }])).toThrow(ApiError);
    try {
      strict.countPrompt([{ role: 'assistant', content: 'a' }]);
    } catch (err) {
      expect((err as ApiError).status).toBe(400);
      expect((err as ApiError).param).toBe('messages');
      expect((err as ApiError).message).toMatch(/first message must be from the user/);
    }
  });
});

describe('TokenizerCache (real Redis)', () => {
  const redis = useTestRedis();

  it.each([
    ['template inside tokenizer_config_json', true],
    ['template in a chat_template field', false],
  ])('loads a registered tokenizer (%s), once per hash', async (_name, inConfig) => {
    const fx = tokenizerFixture();
    const model = `m-${inConfig}`;
    await redis.client.hset(tokenizerKey(model), {
      hash: fx.hash,
      tokenizer_json: fx.tokenizerJson,
      tokenizer_config_json: inConfig ? fx.configWithTemplateJson : fx.configJson,
      ...(inConfig ? {} : { chat_template: fx.chatTemplate }),
    });
    const cache = new TokenizerCache(redis.client, silentLogger);
    const a = await cache.get(model, `h-${inConfig}`);
    const b = await cache.get(model, `h-${inConfig}`);
    expect(a).toBe(b);
    expect(a.countPrompt(fx.cases[0].messages)).toBe(fx.cases[0].count);
  });

  it('fails (and does not cache the failure) when the model has no tokenizer', async () => {
    const cache = new TokenizerCache(redis.client, silentLogger);
    await expect(cache.get('unregistered', 'h')).rejects.toThrow(/not registered/);
    await expect(cache.get('unregistered', 'h')).rejects.toThrow(/not registered/);
  });
});
