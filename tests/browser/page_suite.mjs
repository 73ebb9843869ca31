// The setup every real-Chromium test file shares: one headless Chromium and one sftd server for
// the file (started before its tests, stopped after them), and pages that collect what the page
// logs as errors.
import { before, after } from 'node:test';
import { Server, launchBrowser } from './harness.mjs';

/**
 * Registers the file's before/after hooks and returns `{ server, newPage }`. `server` is the
 * file's sftd (a test may stop and start it again); `newPage(t)` opens a page of `viewport` in
 * a context of its own, closed after test `t`, whose console errors are reported as the test's
 * diagnostics and read with `page.jsErrors()` (network noise left out).
 */
export function pageSuite({ name, viewport }) {
  const server = new Server({ name });
  let browser;
  before(async () => {
    browser = await launchBrowser();
    await server.start();
  });
  after(async () => {
    await browser?.close();
    await server.stop();
  });
  async function newPage(t) {
    const context = await browser.newContext({ viewport });
    const page = await context.newPage();
    const errors = [];
    page.on('pageerror', (e) => errors.push(e.message));
    page.on('console', (m) => { if (m.type() === 'error') errors.push(m.text()); });
    t.after(async () => {
      for (const e of errors) t.diagnostic(`browser console: ${e}`);
      await context.close();
    });
    page.jsErrors = () => errors.filter((e) => !/Failed to load resource|EventSource|net::ERR/.test(e));
    return page;
  }
  return { server, newPage };
}
