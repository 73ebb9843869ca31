// Screenshot of a finished demo job's page at 1280×800 → docs/dashboard.png (real server, real Chromium).
//   cd tests/browser && npm ci && SFTD_BIN=../../target/debug/sftd node screenshot.mjs [out.png]
// SCREENSHOT_WIDTH/SCREENSHOT_HEIGHT change the viewport (e.g. 390×844 for a phone).
import path from 'node:path';
import { Server, launchBrowser, waitFor, sleep, jobPageState, ROOT, EXAMPLE_VAL } from './harness.mjs';
import fs from 'node:fs';

const out = path.resolve(process.argv[2] || path.join(ROOT, 'docs/dashboard.png'));
const width = Number(process.env.SCREENSHOT_WIDTH || 1280);
const height = Number(process.env.SCREENSHOT_HEIGHT || 800);
const steps = Number(process.env.SCREENSHOT_STEPS || 40);

const server = await new Server().start();
const browser = await launchBrowser();
try {
  const hp = { ...(process.env.SCREENSHOT_LR ? { learning_rate: Number(process.env.SCREENSHOT_LR) } : {}), batch_size: 2, gradient_accumulation_steps: 1, max_steps: steps, eval_steps: Math.max(1, Math.round(steps / 5)), save_steps: Math.max(1, Math.round(steps / 2)) };
  const job = await server.submitDemoJob(hp, { validation: fs.existsSync(EXAMPLE_VAL) ? EXAMPLE_VAL : undefined });
  const page = await browser.newPage({ viewport: { width, height }, deviceScaleFactor: 1 });
  await page.goto(`${server.url}/#/jobs/${encodeURIComponent(job.id)}`);
  const state = await waitFor(async () => {
    const s = await jobPageState(page);
    return s && ['succeeded', 'failed', 'cancelled'].includes(s.status) && s.stream === 'complete' ? s : null;
  }, { timeoutMs: 900_000, intervalMs: 250, what: 'the job to finish' });
  await page.getByTestId('result-file').first().waitFor({ timeout: 20_000 }).catch(() => {});
  await page.locator(`[data-testid=checkpoints] tbody tr[data-step="${state.points}"]`).waitFor({ timeout: 10_000 }).catch(() => {});
  await sleep(800);
  // Hover two thirds along the chart so the readout shows one step's values.
  const box = await page.getByTestId('chart').locator('.u-over').boundingBox();
  if (box) await page.mouse.move(box.x + box.width * 0.66, box.y + box.height * 0.5);
  await sleep(300);
  fs.mkdirSync(path.dirname(out), { recursive: true });
  await page.screenshot({ path: out });
  console.log(`${state.status}: ${state.points} points → ${out}`);
} finally {
  await browser.close();
  await server.stop();
}
