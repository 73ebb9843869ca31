// The job page's playground in a real headless Chromium against the real sftd binary and real
// trained demo jobs: presets from the job's validation data, the answer streamed from
// /v1/chat/completions, side by side with the base model, a forced tool call, a JSON answer, and
// a checkpoint while the job trains.
//   cd tests/browser && npm ci && SFTD_BIN=../../target/debug/sftd node --test playground.test.mjs
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { waitFor, EXAMPLE_VAL, MODEL } from './harness.mjs';
import { pageSuite } from './page_suite.mjs';

const JOB_TIMEOUT = Number(process.env.SFTD_JOB_TIMEOUT_MS || 300_000);
const { server, newPage } = pageSuite({ name: 'sftd-playground', viewport: { width: 1280, height: 900 } });

async function waitJob(id, done) {
  return waitFor(async () => {
    const j = await server.api(`/v1/fine_tuning/jobs/${id}`);
    return done(j) ? j : null;
  }, { timeoutMs: JOB_TIMEOUT, intervalMs: 250, what: `job ${id}` });
}

/** Every chat request the page sends, with its body and the response's content type. */
function recordChats(page) {
  const chats = [];
  page.on('response', async (res) => {
    if (!res.url().endsWith('/v1/chat/completions')) return;
    chats.push({ body: JSON.parse(res.request().postData() || '{}'), status: res.status(), type: res.headers()['content-type'] });
  });
  return chats;
}

/** What each answer column shows once all are done. */
async function answers(page, n) {
  const cols = page.getByTestId('play-answer');
  await waitFor(async () => (await cols.count()) === n
    && (await cols.evaluateAll((cs) => cs.every((c) => c.dataset.state === 'done' || c.dataset.state === 'error'))),
  { timeoutMs: 120_000, what: `${n} finished answers` });
  return cols.evaluateAll((cs) => cs.map((c) => ({
    model: c.dataset.model, state: c.dataset.state, finish: c.dataset.finish,
    content: c.querySelector('[data-testid=play-content]').textContent,
    calls: [...c.querySelectorAll('[data-testid=play-tool-call]')].map((e) => ({ name: e.dataset.name, text: e.textContent })),
    footer: c.querySelector('[data-testid=play-finish]').textContent,
  })));
}

function assertAnswered(a, t) {
  t.diagnostic(`${a.model}: ${a.footer} | ${JSON.stringify(a.content.slice(0, 120))} | calls ${a.calls.map((c) => c.name).join(',')}`);
  assert.equal(a.state, 'done', `${a.model} answered: ${a.footer}`);
  assert.match(a.footer, /^finish: (stop|length|tool_calls) · \d+ prompt \+ \d+ completion tokens$/);
  assert.ok(a.content.length > 0 || a.calls.length > 0, `${a.model} said something`);
  // A tool call is shown as a call: its name, then its arguments as pretty JSON in parentheses.
  for (const c of a.calls) assert.ok(c.text.startsWith(`${c.name}(`) && c.text.endsWith(')'), c.text);
  assert.equal(a.finish === 'tool_calls', a.calls.length > 0, 'tool_calls finish exactly when calls are shown');
}

test('a finished job: a preset from its validation data, streamed, side by side with the base model', async (t) => {
  const job = await server.submitDemoJob({ gradient_accumulation_steps: 1, max_steps: 6, save_steps: 3 }, { validation: EXAMPLE_VAL });
  const done = await waitJob(job.id, (j) => ['succeeded', 'failed', 'cancelled'].includes(j.status));
  assert.equal(done.status, 'succeeded', `job ended ${done.status}: ${server.tail()}`);
  const page = await newPage(t);
  const chats = recordChats(page);
  await page.goto(`${server.url}/#/jobs/${encodeURIComponent(job.id)}`);

  // The final model first, then each checkpoint.
  const model = page.getByTestId('play-model');
  const optionIds = () => model.locator('option').evaluateAll((os) => os.map((o) => o.value));
  // The page learns that the job succeeded (and its model id) at its next refresh.
  await waitFor(async () => {
    const ids = await optionIds();
    return ids.length >= 3 && ids[0] === done.fine_tuned_model;
  }, { timeoutMs: 30_000, what: 'the model choices, the final model first' });
  const ids = await optionIds();
  assert.equal(ids[0], done.fine_tuned_model);
  assert.ok(ids.includes(`${done.fine_tuned_model}:ckpt-step-3`), ids.join(' '));

  // Presets: the validation file's tool sets; picking one fills the prompt and offers its tools.
  const presets = await server.api(`/v1/fine_tuning/jobs/${job.id}/chat_presets`);
  assert.ok(presets.data.length > 1 && presets.data.every((p) => p.source === 'validation_file'));
  const withTools = presets.data.find((p) => p.tools.length > 0);
  const options = page.getByTestId('play-preset').locator('option');
  await waitFor(async () => (await options.count()) === presets.data.length + 1, { timeoutMs: 15_000, what: 'the presets' });
  await page.getByTestId('play-preset').selectOption(withTools.id);
  const lastUser = [...withTools.messages].reverse().find((m) => m.role === 'user').content;
  assert.equal(await page.getByTestId('play-user').inputValue(), lastUser);
  const names = withTools.tools.map((x) => x.function.name).join(', ');
  assert.equal(await page.getByTestId('play-tools').innerText(), names);

  await page.getByTestId('play-max-tokens').fill('48');
  await page.getByTestId('play-compare').check();
  await page.getByTestId('play-send').click();
  const shown = await answers(page, 2);
  assert.deepEqual(shown.map((a) => a.model), [done.fine_tuned_model, MODEL], 'fine-tuned, then base');
  for (const a of shown) assertAnswered(a, t);
  // Both were streamed requests with the preset's tools, answered as server-sent events.
  assert.equal(chats.length, 2);
  for (const c of chats) {
    assert.equal(c.status, 200);
    assert.match(c.type, /^text\/event-stream/);
    assert.equal(c.body.stream, true);
    assert.deepEqual(c.body.tools.map((x) => x.function.name), withTools.tools.map((x) => x.function.name));
    assert.equal(c.body.temperature, 0);
  }
  // Greedy: the page shows exactly what the API answers for the same request.
  const plain = await server.api('/v1/chat/completions', { method: 'POST', json: { ...chats[0].body, stream: false, stream_options: undefined } });
  const msg = plain.choices[0].message;
  assert.equal(shown[0].content, msg.content ?? '');
  assert.deepEqual(shown[0].calls.map((c) => c.name), (msg.tool_calls || []).map((c) => c.function.name));

  // A named function forces the answer to be a call to it (or, if the budget runs out inside
  // the arguments, text that opens that call).
  const forced = withTools.tools[withTools.tools.length - 1].function.name;
  const choices = await page.getByTestId('play-tool-choice').locator('option').evaluateAll((os) => os.map((o) => o.value));
  assert.deepEqual(choices, ['auto', 'none', 'required', ...withTools.tools.map((x) => `call:${x.function.name}`)]);
  await page.getByTestId('play-tool-choice').selectOption(`call:${forced}`);
  await page.getByTestId('play-compare').uncheck();
  await page.getByTestId('play-max-tokens').fill('96');
  await page.getByTestId('play-send').click();
  await waitFor(async () => chats.length === 3, { timeoutMs: 15_000, what: 'the forced request' });
  const [f] = await answers(page, 1);
  assertAnswered(f, t);
  assert.deepEqual(chats[2].body.tool_choice, { type: 'function', function: { name: forced } });
  if (f.finish === 'tool_calls') assert.deepEqual(f.calls.map((c) => c.name), [forced]);
  else {
    assert.equal(f.finish, 'length', f.footer);
    assert.ok(f.content.startsWith(`<tool_call>\n{"name": "${forced}", "arguments": `), f.content);
  }

  // A JSON answer: the forced tool choices are off (the API refuses them with a JSON answer),
  // the request carries response_format, and the answer is a JSON object (or, cut by the
  // budget, the start of one).
  await page.getByTestId('play-format').selectOption('json_object');
  assert.equal(await page.getByTestId('play-tool-choice').inputValue(), 'auto', 'a forced choice gave way');
  const disabled = await page.getByTestId('play-tool-choice').locator('option').evaluateAll((os) => os.filter((o) => o.disabled).map((o) => o.value));
  assert.deepEqual(disabled, ['required', ...withTools.tools.map((x) => `call:${x.function.name}`)]);
  await page.getByTestId('play-send').click();
  await waitFor(async () => chats.length === 4, { timeoutMs: 15_000, what: 'the JSON request' });
  const [j] = await answers(page, 1);
  assertAnswered(j, t);
  assert.deepEqual(chats[3].body.response_format, { type: 'json_object' });
  assert.equal(chats[3].status, 200);
  assert.ok(j.content.startsWith('{'), j.content);
  if (j.finish === 'stop') assert.equal(typeof JSON.parse(j.content), 'object', j.content);
  else assert.equal(j.finish, 'length', j.footer);
  assert.deepEqual(page.jsErrors(), []);
});

test('while a job trains, its latest checkpoint answers in the playground and the job keeps running', async (t) => {
  const job = await server.submitDemoJob({ batch_size: 1, gradient_accumulation_steps: 1, max_steps: 5000, save_steps: 2 });
  t.after(() => server.api(`/v1/fine_tuning/jobs/${job.id}/cancel`, { method: 'POST' }).catch(() => {}));
  const page = await newPage(t);
  await page.goto(`${server.url}/#/jobs/${encodeURIComponent(job.id)}`);
  const model = page.getByTestId('play-model');
  await waitFor(async () => (await model.locator('option').count()) >= 1, { timeoutMs: JOB_TIMEOUT, what: 'a checkpoint to chat with' });
  const chosen = await model.inputValue();
  assert.match(chosen, /:ckpt-step-\d+$/, 'only checkpoints while it runs');
  await page.getByTestId('play-user').fill('What is the weather in Paris?');
  await page.getByTestId('play-max-tokens').fill('24');
  await page.getByTestId('play-send').click();
  const [a] = await answers(page, 1);
  assert.equal(a.model, chosen);
  assertAnswered(a, t);
  const j = await server.api(`/v1/fine_tuning/jobs/${job.id}`);
  assert.equal(j.status, 'running', 'answered between the micro-batches of a running job');
  assert.equal(await page.getByTestId('job-status').getAttribute('data-status'), 'running');
  assert.deepEqual(page.jsErrors(), []);
});
