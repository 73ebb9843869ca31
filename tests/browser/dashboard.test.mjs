// The dashboard in a real headless Chromium against the real sftd binary.
//   cd tests/browser && npm ci && SFTD_BIN=../../target/debug/sftd npm test
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { pageSuite } from './page_suite.mjs';
import { Server, waitFor, tempDir, metricSteps, sleep, jobPageState, parseRanges, EXAMPLE, EXAMPLE_VAL, MODEL } from './harness.mjs';

const JOB_TIMEOUT = Number(process.env.SFTD_JOB_TIMEOUT_MS || 300_000);
const RESTART_STEPS = Number(process.env.SFTD_RESTART_STEPS || 16);
const { server, newPage } = pageSuite({ name: 'sftd', viewport: { width: 1280, height: 800 } });

/** Follow the job page until a terminal status, recording every point count it showed. */
async function followJob(page, { timeoutMs = JOB_TIMEOUT, onTick, srv = server } = {}) {
  const seen = [];
  const state = await waitFor(async () => {
    const s = await jobPageState(page);
    if (s && (seen.length === 0 || seen[seen.length - 1] !== s.points)) seen.push(s.points);
    if (onTick) await onTick(s);
    return s && ['succeeded', 'failed', 'cancelled'].includes(s.status) && s.stream === 'complete' ? s : null;
  }, { timeoutMs, intervalMs: 100, what: 'the job page to show a terminal status' }).catch((e) => {
    const alive = srv.proc && srv.proc.exitCode === null && !srv.proc.signalCode;
    throw new Error(`${e.message}; ${srv.name} ${alive ? 'running' : 'exited'}; its log:\n${srv.tail(40)}`);
  });
  // Let the last frame draw.
  await sleep(400);
  return { state: await jobPageState(page), seen };
}

function assertContiguous(steps, total, msg) {
  assert.deepEqual(steps, Array.from({ length: total }, (_, i) => i + 1), msg);
}

test('a bad file gets every bad line shown with its number and message', async (t) => {
  const page = await newPage(t);
  const dir = tempDir();
  const good = fs.readFileSync(EXAMPLE, 'utf8').split('\n').find((l) => l.trim());
  const bad = path.join(dir, 'bad.jsonl');
  fs.writeFileSync(bad, [good, '{"messages": [', good, 'this is not JSON', ''].join('\n'));
  await page.goto(`${server.url}/#/new`);
  await page.getByTestId('training-file').setInputFiles(bad);
  const items = page.getByTestId('file-error');
  await waitFor(async () => (await items.count()) >= 2, { timeoutMs: 20_000, what: 'line errors' });
  const lines = await items.evaluateAll((els) => els.map((e) => Number(e.dataset.line)));
  assert.deepEqual(lines, [2, 4], 'lines 2 and 4 are the bad ones');
  const text = await page.getByTestId('file-errors').innerText();
  assert.match(text, /line 2/);
  assert.match(text, /line 4/);
  for (const t2 of (await items.allInnerTexts())) assert.ok(t2.replace(/line \d+/, '').trim().length > 3, `message shown: ${t2}`);
  // Submitting with the bad file explains why instead of sending it.
  await page.getByTestId('submit-job').click();
  await waitFor(async () => (await page.getByTestId('form-error').innerText()).length > 0, { what: 'form error' });
  assert.deepEqual(page.jsErrors(), []);
});

test('an API error on submit is shown with the field it names', async (t) => {
  const page = await newPage(t);
  await page.goto(`${server.url}/#/new`);
  await page.getByTestId('training-file').setInputFiles(EXAMPLE);
  await page.getByTestId('training-file-id').waitFor({ timeout: 30_000 });
  await page.getByTestId('hp-lora-r').fill('0');
  await page.getByTestId('submit-job').click();
  const box = page.getByTestId('form-error');
  await waitFor(async () => (await box.innerText()).length > 0, { timeoutMs: 15_000, what: 'form error' });
  const text = await box.innerText();
  t.diagnostic(`shown: ${text}`);
  assert.match(text, /lora\.r/, 'the error names the field');
  assert.equal(await page.getByTestId('hp-lora-r').getAttribute('aria-invalid'), 'true', 'the field is marked');
  assert.match(page.url(), /#\/new$/, 'still on the form');

  // A file uploaded earlier can be picked again instead of re-uploading.
  await page.reload();
  const existing = page.getByTestId('training-file-existing');
  await existing.waitFor({ state: 'visible', timeout: 10_000 });
  const values = await existing.locator('option').evaluateAll((os) => os.map((o) => o.value).filter(Boolean));
  assert.ok(values.length >= 1, 'earlier uploads are offered');
  await existing.selectOption(values[0]);
  assert.equal(await page.getByTestId('training-file-id').innerText(), values[0]);
  assert.deepEqual(page.jsErrors(), []);
});

test('a demo job submitted through the form draws every step live and ends succeeded', async (t) => {
  const page = await newPage(t);
  await page.goto(`${server.url}/#/new`);
  await page.getByTestId('training-file').setInputFiles(EXAMPLE);
  await page.getByTestId('training-file-id').waitFor({ timeout: 30_000 });
  await page.getByTestId('model').fill(MODEL);
  await page.getByTestId('hp-n_epochs').fill('1');
  await page.getByTestId('hp-batch_size').fill('2');
  await page.getByTestId('hp-gradient_accumulation_steps').fill('1');
  await page.getByTestId('hp-max_seq_len').fill('256');
  await page.getByTestId('advanced').locator('summary').click();
  await page.getByTestId('hp-max_steps').fill('8');
  await page.getByTestId('submit-job').click();
  await page.waitForURL(/#\/jobs\//, { timeout: 30_000 });
  const jobId = decodeURIComponent(page.url().split('#/jobs/')[1]);
  t.diagnostic(`job ${jobId}`);

  const { state, seen } = await followJob(page);
  t.diagnostic(`point counts seen: ${seen.join(' ')}`);
  assert.equal(state.status, 'succeeded', `job ended ${state.status}; server log:\n${server.tail()}`);
  assert.equal(await page.getByTestId('job-status').getAttribute('data-status'), 'succeeded');

  const { steps, total } = metricSteps(await server.events(jobId));
  assert.ok(total >= 1 && total <= 8, `total steps ${total}`);
  assertContiguous(steps, total, 'server recorded every step once');
  assert.equal(state.points, total, 'one chart point per step');
  assertContiguous(state.steps, total, 'the chart holds steps 1..N');
  for (let i = 1; i < seen.length; i++) assert.ok(seen[i] >= seen[i - 1], `point count never shrinks: ${seen}`);
  assert.equal(await page.getByTestId('chart').getAttribute('data-points'), String(total));
  assert.equal(await page.getByTestId('progress').evaluate((p) => p.value === p.max), true, 'progress bar full');

  // Download links: every result file answers 200 with content; the adapter is among them.
  const links = page.getByTestId('result-file');
  await waitFor(async () => (await links.count()) > 0, { timeoutMs: 20_000, what: 'result file links' });
  await waitFor(async () => (await links.evaluateAll((as) => as.every((a) => a.dataset.filename))), { timeoutMs: 10_000, what: 'file names' });
  const files = await links.evaluateAll((as) => as.map((a) => ({ href: a.href, name: a.dataset.filename })));
  t.diagnostic(`result files: ${files.map((f) => f.name).join(', ')}`);
  assert.ok(files.some((f) => /adapter/.test(f.name)), 'an adapter file is offered');
  for (const f of files) {
    const r = await page.evaluate(async (href) => { const res = await fetch(href); return { status: res.status, size: (await res.arrayBuffer()).byteLength }; }, f.href);
    assert.equal(r.status, 200, `${f.name} downloads`);
    assert.ok(r.size > 0, `${f.name} is not empty`);
  }

  // The checkpoints table lists the final adapter's step.
  const ckpts = page.locator('[data-testid=checkpoints] tbody tr');
  await waitFor(async () => (await ckpts.count()) >= 1, { timeoutMs: 15_000, what: 'the checkpoints table' });
  assert.equal(await ckpts.first().getAttribute('data-step'), String(total), 'newest checkpoint first, at the last step');

  // The jobs list shows it finished.
  await page.getByTestId('nav-jobs').click();
  const row = page.locator(`[data-testid=job-row][data-job-id="${jobId}"]`);
  await waitFor(async () => (await row.getAttribute('data-status')) === 'succeeded', { timeoutMs: 10_000, what: 'jobs row' });
  await waitFor(async () => (await row.innerText()).includes(`${total} / ${total}`), { timeoutMs: 10_000, what: 'the row to show N / N steps' });
  assert.match(await row.innerText(), /\d\.\d{2,}/, 'the row shows the latest loss');

  // A finished job's page rebuilds its whole history from the stream.
  await page.goto(`${server.url}/#/jobs/${encodeURIComponent(jobId)}`);
  await page.reload();
  const again = await followJob(page, { timeoutMs: 30_000 });
  assert.equal(again.state.points, total);
  assert.equal(again.state.status, 'succeeded');

  // Keyboard: the chart takes focus and the arrow keys walk the steps.
  await page.getByTestId('chart').focus();
  await page.keyboard.press('End');
  assert.match(await page.getByTestId('hover-readout').innerText(), new RegExp(`^step ${total} `));
  await page.keyboard.press('Home');
  await page.keyboard.press('ArrowRight');
  assert.match(await page.getByTestId('hover-readout').innerText(), /^step 2 .*loss \d/);

  // Phone width: one column, nothing wider than the screen.
  await page.setViewportSize({ width: 390, height: 844 });
  await sleep(300);
  const { overflow, widest } = await page.evaluate(() => {
    // Name the innermost elements that stick out, so a failure says what to fix.
    const out = [...document.querySelectorAll('body *')]
      .filter((e) => e.getBoundingClientRect().right > window.innerWidth + 1)
      .filter((e) => ![...e.children].some((c) => c.getBoundingClientRect().right > window.innerWidth + 1))
      .slice(0, 5)
      .map((e) => `${e.tagName.toLowerCase()}.${e.className || ''}[${e.dataset.testid || ''}] ${Math.round(e.getBoundingClientRect().width)}px`);
    return { overflow: document.documentElement.scrollWidth - window.innerWidth, widest: out.join(', ') };
  });
  assert.ok(overflow <= 0, `job page fits a 390 px screen (overflow ${overflow}px: ${widest})`);
  assert.deepEqual(page.jsErrors(), []);
});

test('tool-call accuracy from the event stream is drawn on its own axis', async (t) => {
  const page = await newPage(t);
  const job = await server.submitDemoJob({
    gradient_accumulation_steps: 1, max_steps: 4, eval_steps: 2, tool_eval_max_examples: 4, tool_eval_max_new_tokens: 8,
  }, { validation: EXAMPLE_VAL });
  await page.goto(`${server.url}/#/jobs/${encodeURIComponent(job.id)}`);
  const { state } = await followJob(page);
  assert.equal(state.status, 'succeeded', `job ended ${state.status}; server log:\n${server.tail()}`);
  const toolEvents = (await server.events(job.id)).filter((e) => e.type === 'metrics' && typeof e.data?.tool_eval_examples === 'number');
  const serverSteps = toolEvents.map((e) => e.data.step);
  t.diagnostic(`tool_eval events at steps ${serverSteps.join(',')}: ${toolEvents.map((e) => e.message).join(' | ')}`);
  assert.deepEqual(serverSteps, [0, 2, 4], 'step 0, every eval_steps and the last');
  // The chart drew a point for each of them, from the stream.
  const chart = page.getByTestId('chart');
  assert.deepEqual(parseRanges(await chart.getAttribute('data-tool-steps')), serverSteps);
  const axes = (await chart.getAttribute('data-axes')).split(',');
  assert.ok(axes.includes('tool-call accuracy'), `axes: ${axes}`);
  const legend = await chart.locator('.u-legend').innerText();
  for (const label of ['tool name accuracy', 'tool args exact', 'tool args valid', 'tool JSON valid', 'no-call accuracy']) assert.ok(legend.includes(label), `legend lists ${label}: ${legend}`);
  // The readout at step 0 (the starting model) has the rates the server reported.
  await chart.focus();
  await page.keyboard.press('Home');
  const readout = await page.getByTestId('hover-readout').innerText();
  const first = toolEvents[0].data;
  assert.match(readout, /^step 0 /);
  const pct = 100 * first.tool_name_accuracy;
  const shown = `${pct >= 10 || pct === 0 ? pct.toFixed(0) : pct.toFixed(1)}%`; // format.js fmtPct
  assert.ok(readout.includes(`tool name accuracy ${shown}`), `readout: ${readout}`);
  const last = toolEvents[toolEvents.length - 1].data;
  const stat = await page.getByTestId('stat-tool-name').innerText();
  assert.ok(stat.endsWith(`@ ${last.step}`), `progress card shows the latest: ${stat}`);
  assert.deepEqual(page.jsErrors(), []);
});

for (const signal of ['SIGTERM', 'SIGKILL']) test(`a server restart mid-run (${signal}) neither duplicates nor drops points`, async (t) => {
  const page = await newPage(t);
  const job = await server.submitDemoJob({ batch_size: 1, gradient_accumulation_steps: 1, max_steps: RESTART_STEPS, save_steps: 2 });
  await page.goto(`${server.url}/#/jobs/${encodeURIComponent(job.id)}`);
  await waitFor(async () => ((await jobPageState(page))?.points ?? 0) >= 3, { timeoutMs: JOB_TIMEOUT, what: 'three points before the restart' });
  const before = await jobPageState(page);
  if (before.status === 'succeeded') t.diagnostic('job finished before the restart; the restart still has to keep the history intact');
  await server.stop(signal);
  t.diagnostic(`server stopped (${signal}) at ${before.points} points (seq ${before.lastSeq})`);
  await sleep(1500);
  await server.start();
  const { state, seen } = await followJob(page);
  t.diagnostic(`point counts seen: ${seen.join(' ')}; duplicates dropped by seq: ${state.duplicates}`);
  assert.equal(state.status, 'succeeded', `job ended ${state.status}; server log:\n${server.tail()}`);
  const { steps, total, records } = metricSteps(await server.events(job.id));
  t.diagnostic(`server: ${records} metrics events for ${steps.length} distinct steps`);
  assertContiguous(steps, total, 'server recorded every step');
  assert.equal(state.points, total, 'one chart point per step after the restart');
  assertContiguous(state.steps, total, 'no gaps');
  for (let i = 1; i < seen.length; i++) assert.ok(seen[i] >= seen[i - 1], `point count never shrinks: ${seen}`);
  assert.deepEqual(page.jsErrors(), []);
});

test('cancel from the job page stops the run and the page shows it', async (t) => {
  const page = await newPage(t);
  const job = await server.submitDemoJob({ batch_size: 1, gradient_accumulation_steps: 1, max_steps: 5000 });
  await page.goto(`${server.url}/#/jobs/${encodeURIComponent(job.id)}`);
  await waitFor(async () => ((await jobPageState(page))?.points ?? 0) >= 1, { timeoutMs: JOB_TIMEOUT, what: 'a first point' });
  const cancel = page.getByTestId('job-cancel');
  await cancel.click();
  assert.match(await cancel.innerText(), /confirm/i, 'the first press asks for confirmation');
  await cancel.click();
  const { state } = await followJob(page, { timeoutMs: 60_000 });
  assert.equal(state.status, 'cancelled');
  assert.equal(await cancel.isVisible(), false, 'no cancel button on a finished job');
  const { steps } = metricSteps(await server.events(job.id));
  assert.equal(state.points, steps.length, 'every recorded step drawn');
  assert.ok(steps.length < 5000);
  assert.deepEqual(page.jsErrors(), []);
});

test('with SFTD_API_KEY the page asks for the key once and uses it for API and stream', async (t) => {
  const keyed = await new Server({ name: 'sftd-keyed', env: { SFTD_API_KEY: 'sk-test-browser' } }).start();
  t.after(async () => {
    if (keyed.proc.exitCode !== null || keyed.proc.signalCode) t.diagnostic(`sftd-keyed exited early: ${keyed.proc.exitCode ?? keyed.proc.signalCode}`);
    await keyed.stop();
  });
  const page = await newPage(t);
  await page.goto(`${keyed.url}/`);
  const dialog = page.getByTestId('api-key-dialog');
  await dialog.waitFor({ state: 'visible', timeout: 15_000 });
  // Dismissed, it stays closed (the list keeps polling) until the header's button is pressed.
  await page.keyboard.press('Escape');
  await dialog.waitFor({ state: 'hidden', timeout: 5_000 });
  await sleep(4500);
  assert.equal(await dialog.isVisible(), false, 'not asked again after Escape');
  await page.getByTestId('api-key-button').click();
  await dialog.waitFor({ state: 'visible', timeout: 5_000 });
  await page.getByTestId('api-key-input').fill('wrong-key');
  await page.getByTestId('api-key-submit').click();
  await waitFor(async () => (await page.getByTestId('api-key-error').innerText()).length > 0 && (await dialog.isVisible()), { timeoutMs: 10_000, what: 'rejected-key message' });
  await page.getByTestId('api-key-input').fill('sk-test-browser');
  await page.getByTestId('api-key-submit').click();
  await dialog.waitFor({ state: 'hidden', timeout: 10_000 });
  assert.equal(await page.evaluate(() => localStorage.getItem('sftd.apiKey')), 'sk-test-browser');
  await waitFor(async () => (await page.getByTestId('jobs-note').innerText()) === '', { timeoutMs: 10_000, what: 'jobs list loaded' });

  const job = await keyed.submitDemoJob({ gradient_accumulation_steps: 1, max_steps: 3 }, { key: 'sk-test-browser' });
  await page.goto(`${keyed.url}/#/jobs/${encodeURIComponent(job.id)}`);
  const { state } = await followJob(page, { srv: keyed });
  assert.equal(state.status, 'succeeded', `keyed job ended ${state.status}; server log:\n${keyed.tail()}`);
  const { total } = metricSteps(await keyed.events(job.id, { key: 'sk-test-browser' }));
  assert.equal(state.points, total, 'the stream (access_token) delivered every step');
  assert.equal(await dialog.isVisible(), false, 'asked only once');
  const link = page.getByTestId('result-file').first();
  await link.waitFor({ timeout: 20_000 });
  const [download] = await Promise.all([page.waitForEvent('download', { timeout: 20_000 }), link.click()]);
  assert.ok(fs.statSync(await download.path()).size > 0, 'download with the key works');
  assert.deepEqual(page.jsErrors(), []);
});
