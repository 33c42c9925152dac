// Type-checks Grafana dashboard JSON against @grafana/schema with tsc --strict.
//
//   node tests/ops/grafana/typecheck.mjs --project DIR dashboards/*.json
//
// DIR is where this package (package.json + package-lock.json) was installed
// with `npm ci` (scripts/check-ops.sh uses .cache/ops-npm). For each
// dashboard it writes DIR/check/<name>.ts:
//
//   import type { Dashboard } from '@grafana/schema';
//   export const d = <the JSON> satisfies Json<Dashboard>;
//
// plus one `satisfies` per panel for its `options` and
// `fieldConfig.defaults.custom` against that panel plugin's own types
// (timeseries, stat, table), which the Dashboard type leaves as
// Record<string, unknown>. Then it runs `tsc --noEmit --strict` on them.
//
// Json<T> is T as it reads in JSON: a TypeScript string enum (ThresholdsMode,
// FieldColorModeId, ...) becomes the union of its string values, because
// `"absolute"` in JSON is exactly ThresholdsMode.Absolute but TypeScript's
// enums are nominal. Everything else (required keys, excess keys, numeric
// enums, literal unions) is checked as the schema declares it.
//
// Exit status: 0 all dashboards type-check, 1 type errors (printed with the
// offending line), 2 usage or set-up problem.

import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

const PANEL_TYPES = {
  timeseries: {
    module: '@grafana/schema/dist/esm/raw/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen',
    alias: 'TimeSeries',
  },
  stat: {
    module: '@grafana/schema/dist/esm/raw/composable/stat/panelcfg/x/StatPanelCfg_types.gen',
    alias: 'Stat',
    noCustom: true,
  },
  table: {
    module: '@grafana/schema/dist/esm/raw/composable/table/panelcfg/x/TablePanelCfg_types.gen',
    alias: 'Table',
  },
};

function usage(msg) {
  console.error(`typecheck.mjs: ${msg}\nusage: node typecheck.mjs --project DIR DASHBOARD.json...`);
  process.exit(2);
}

const args = process.argv.slice(2);
let project = null;
const files = [];
for (let i = 0; i < args.length; i++) {
  if (args[i] === '--project') project = args[++i];
  else if (args[i].startsWith('--')) usage(`unknown option ${args[i]}`);
  else files.push(args[i]);
}
if (!project) usage('--project is required');
if (files.length === 0) usage('no dashboards given');
project = path.resolve(project);
const tscPath = path.join(project, 'node_modules', 'typescript', 'bin', 'tsc');
const schemaPkg = path.join(project, 'node_modules', '@grafana', 'schema', 'package.json');
for (const p of [tscPath, schemaPkg]) {
  if (!fs.existsSync(p)) usage(`${p} is missing: run \`npm ci\` in ${project} (scripts/check-ops.sh does)`);
}
const schemaVersion = JSON.parse(fs.readFileSync(schemaPkg, 'utf8')).version;

const checkDir = path.join(project, 'check');
fs.rmSync(checkDir, { recursive: true, force: true });
fs.mkdirSync(checkDir, { recursive: true });

const header = `import type { Dashboard } from '@grafana/schema';
${Object.values(PANEL_TYPES)
  .map((t) => `import type * as ${t.alias} from '${t.module}';`)
  .join('\n')}

/** T as it reads in JSON: string enums become their string values. */
type Json<T> = T extends string
  ? \`\${T}\`
  : T extends number | boolean | null | undefined
    ? T
    : T extends ReadonlyArray<infer U>
      ? Array<Json<U>>
      : T extends object
        ? { [K in keyof T]: Json<T[K]> }
        : T;
`;

function panelsOf(dashboard) {
  const out = [];
  for (const p of dashboard.panels ?? []) {
    out.push(p);
    for (const inner of p.panels ?? []) out.push(inner);
  }
  return out;
}

const sources = [];
const problems = [];
for (const file of files) {
  let d;
  try {
    d = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (e) {
    problems.push(`${file}: not JSON: ${e.message}`);
    continue;
  }
  const name = path.basename(file).replace(/\.json$/, '').replace(/[^A-Za-z0-9_]/g, '_');
  let ts = `${header}\n// ${file}\nexport const d = ${JSON.stringify(d, null, 2)} satisfies Json<Dashboard>;\n`;
  for (const p of panelsOf(d)) {
    if (p.type === 'row') continue;
    const t = PANEL_TYPES[p.type];
    if (!t) {
      problems.push(`${file}: panel ${p.id} ${JSON.stringify(p.title)}: no options type known for panel type ${JSON.stringify(p.type)} (add it to PANEL_TYPES)`);
      continue;
    }
    const custom = p.fieldConfig?.defaults?.custom;
    const shape = { options: p.options ?? {} };
    let type = `{ options: Json<Partial<${t.alias}.Options>>`;
    if (custom !== undefined) {
      if (t.noCustom) {
        problems.push(`${file}: panel ${p.id} ${JSON.stringify(p.title)}: ${p.type} panels take no fieldConfig.defaults.custom`);
      }
      shape.custom = custom;
      type += `; custom: Json<Partial<${t.alias}.FieldConfig>>`;
    }
    type += ' }';
    ts += `\n// panel ${p.id}: ${JSON.stringify(p.title)} (${p.type})\nexport const panel_${p.id} = ${JSON.stringify(shape, null, 2)} satisfies ${type};\n`;
  }
  const out = path.join(checkDir, `${name}.ts`);
  fs.writeFileSync(out, ts);
  sources.push({ file, out });
}

fs.writeFileSync(
  path.join(checkDir, 'tsconfig.json'),
  JSON.stringify(
    {
      compilerOptions: {
        strict: true,
        noEmit: true,
        target: 'es2022',
        module: 'esnext',
        moduleResolution: 'bundler',
        skipLibCheck: true,
        types: [],
      },
      files: sources.map((s) => path.basename(s.out)),
    },
    null,
    2,
  ),
);

if (problems.length) {
  for (const p of problems) console.error(p);
  process.exit(1);
}

const r = spawnSync(process.execPath, [tscPath, '--noEmit', '--strict', '-p', path.join(checkDir, 'tsconfig.json'), '--pretty', 'false'], {
  encoding: 'utf8',
});
const output = `${r.stdout ?? ''}${r.stderr ?? ''}`.trim();
if (r.status !== 0) {
  // Show each error with the line it points at, so the JSON path is visible.
  const cache = new Map();
  for (const line of output.split('\n')) {
    console.error(line);
    const m = /^(.*\.ts)\((\d+),(\d+)\)/.exec(line);
    if (m) {
      const f = path.resolve(checkDir, m[1]);
      if (!cache.has(f)) cache.set(f, fs.existsSync(f) ? fs.readFileSync(f, 'utf8').split('\n') : []);
      const lines = cache.get(f);
      const n = Number(m[2]);
      for (let i = Math.max(1, n - 3); i <= Math.min(lines.length, n + 1); i++) {
        console.error(`    ${i === n ? '>' : ' '} ${String(i).padStart(5)} | ${lines[i - 1]}`);
      }
    }
  }
  console.error(`\n@grafana/schema ${schemaVersion}: type check FAILED (generated sources in ${checkDir})`);
  process.exit(1);
}
for (const s of sources) console.log(`${s.file}: ok (@grafana/schema ${schemaVersion}, tsc --strict)`);
