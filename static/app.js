// sftd dashboard, the entry module: a single-page app on the /v1 API. Plain ES modules, no build
// step, works offline. Routes: #/ (jobs), #/new (new job), #/jobs/{id} (live job view).
import { initKeyButton } from './api.js';
import { $ } from './dom.js';
import { jobsView } from './jobs.js';
import { jobView } from './job.js';
import { newJobView } from './form.js';
import { startRouter } from './router.js';

let rerender = () => {};
initKeyButton(() => rerender());
rerender = startRouter($('#main'), [
  { pattern: /^#\/jobs\/([^/?#]+)/, view: jobView },
  { pattern: /^#\/new/, nav: 'new', title: 'New job · sftd', view: newJobView },
  { pattern: /^/, nav: 'jobs', view: jobsView },
]);
