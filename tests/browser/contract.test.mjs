// The page and the server speak one vocabulary: static/vocabulary.js against openapi.yaml's Event,
// <Kind>EventData, Job and Checkpoint schemas (both ways), and the server's StepMetrics
// (src/train/events.rs) against openapi.yaml. No browser, no server: `node --test contract.test.mjs`.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { parse } from 'yaml';
import { ROOT } from './harness.mjs';

const V = await import(`data:text/javascript;base64,${fs.readFileSync(path.join(ROOT, 'static/vocabulary.js')).toString('base64')}`);
const spec = parse(fs.readFileSync(path.join(ROOT, 'openapi.yaml'), 'utf8'));
const schemas = spec.components.schemas;

/** Fails naming each field one side has and the other lacks. */
function sameFields(specFields, pageFields, specWhere, pageWhere) {
  const s = new Set(specFields); const p = new Set(pageFields);
  const problems = [
    ...[...s].filter((f) => !p.has(f)).map((f) => `openapi.yaml ${specWhere} has \`${f}\`, which static/vocabulary.js ${pageWhere} does not know`),
    ...[...p].filter((f) => !s.has(f)).map((f) => `static/vocabulary.js ${pageWhere} has \`${f}\`, which openapi.yaml ${specWhere} does not define`),
  ];
  assert.deepEqual(problems, [], problems.join('\n'));
}

const props = (name) => {
  assert.ok(schemas[name]?.properties, `openapi.yaml components.schemas.${name} has no properties`);
  return Object.keys(schemas[name].properties);
};

test('the event envelope, its types and levels', () => {
  const ev = schemas.Event.properties;
  sameFields(Object.keys(ev), V.EVENT_FIELDS, 'components.schemas.Event.properties', 'EVENT_FIELDS');
  sameFields(ev.type.enum, V.EVENT_TYPES, 'components.schemas.Event.properties.type.enum', 'EVENT_TYPES');
  sameFields(ev.level.enum, V.EVENT_LEVELS, 'components.schemas.Event.properties.level.enum', 'EVENT_LEVELS');
});

test("every kind of event data, field by field", () => {
  const refs = schemas.Event.properties.data.oneOf.filter((o) => o.$ref).map((o) => o.$ref.split('/').pop());
  // ToolEvalEventData → tool_eval
  const kindOf = (schema) => schema.replace(/EventData$/, '').replace(/([a-z])([A-Z])/g, '$1_$2').toLowerCase();
  sameFields(refs.map(kindOf), Object.keys(V.EVENT_DATA), 'Event.properties.data.oneOf (<Kind>EventData)', 'EVENT_DATA kinds');
  for (const ref of refs) {
    const kind = kindOf(ref);
    const page = V.EVENT_DATA[kind];
    sameFields(props(ref), page.fields, `components.schemas.${ref}.properties`, `EVENT_DATA.${kind}.fields`);
    assert.ok((schemas[ref].required || []).includes(page.key),
      `static/vocabulary.js EVENT_DATA.${kind}.key \`${page.key}\` must be required in openapi.yaml components.schemas.${ref}`);
  }
});

test('job statuses and job fields', () => {
  sameFields(schemas.Job.properties.status.enum, V.JOB_STATUSES, 'components.schemas.Job.properties.status.enum', 'JOB_STATUSES');
  sameFields(schemas.StatusEventData.properties.status.enum, V.JOB_STATUSES, 'components.schemas.StatusEventData.properties.status.enum', 'JOB_STATUSES');
  sameFields(props('Job'), V.JOB_FIELDS, 'components.schemas.Job.properties', 'JOB_FIELDS');
  sameFields(Object.keys(schemas.Checkpoint.properties.metrics.properties), V.CHECKPOINT_METRICS,
    'components.schemas.Checkpoint.properties.metrics.properties', 'CHECKPOINT_METRICS');
});

/** The `pub` fields of `pub struct NAME { … }` in a Rust source file. */
function rustFields(file, name) {
  const src = fs.readFileSync(path.join(ROOT, file), 'utf8');
  const body = src.match(new RegExp(`pub struct ${name} \\{([\\s\\S]*?)\\n\\}`));
  assert.ok(body, `${file} has no \`pub struct ${name} { … }\``);
  return [...body[1].matchAll(/^\s*pub (\w+):/gm)].map((m) => m[1]);
}

test("the server's StepMetrics fields are all in openapi.yaml's MetricsEventData", () => {
  const fields = rustFields('src/train/events.rs', 'StepMetrics');
  assert.ok(fields.includes('train_loss'), `parsed StepMetrics fields: ${fields}`);
  const spec = new Set(props('MetricsEventData'));
  const missing = fields.filter((f) => !spec.has(f));
  assert.deepEqual(missing, [], missing.map((f) => `src/train/events.rs StepMetrics has \`${f}\`, which openapi.yaml components.schemas.MetricsEventData does not define`).join('\n'));
});

test("the server's ToolEvalMetrics fields are exactly openapi.yaml's ToolEvalEventData", () => {
  const fields = rustFields('src/train/tool_eval.rs', 'ToolEvalMetrics');
  assert.ok(fields.includes('tool_name_accuracy'), `parsed ToolEvalMetrics fields: ${fields}`);
  sameFields(props('ToolEvalEventData'), fields, 'components.schemas.ToolEvalEventData.properties', '(src/train/tool_eval.rs ToolEvalMetrics)');
});
