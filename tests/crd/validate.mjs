// Validates custom resources against the @kubernetes-models CRD models
// (their `.validate()`, JSON schemas generated from the CRDs).
//
//   node tests/crd/validate.mjs MODULES_DIR FILE.json
//
// MODULES_DIR holds node_modules from this directory's package-lock.json;
// FILE.json is a `v1` List. Prints one line per object; exits 1 if any is
// invalid or of a kind without a model.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const [modules, file] = process.argv.slice(2);
const model = async (pkg, group) =>
  import(pathToFileURL(join(modules, "node_modules/@kubernetes-models", pkg, group, "index.js")));
const kinds = {
  "argoproj.io/v1alpha1": await model("argo-rollouts", "argoproj.io/v1alpha1"),
  "gateway.networking.k8s.io/v1": await model("gateway-api", "gateway.networking.k8s.io/v1"),
  "keda.sh/v1alpha1": await model("keda", "keda.sh/v1alpha1"),
};

let failed = 0;
for (const item of JSON.parse(readFileSync(file, "utf8")).items) {
  const id = `${item.kind}/${item.metadata.name}`;
  const Model = kinds[item.apiVersion]?.[item.kind];
  if (!Model) {
    console.log(`no model: ${item.apiVersion} ${id}`);
    failed++;
    continue;
  }
  try {
    new Model(item).validate();
    console.log(`valid: ${item.apiVersion} ${id}`);
  } catch (err) {
    console.log(`invalid: ${item.apiVersion} ${id}: ${err.message}`);
    failed++;
  }
}
process.exit(failed ? 1 : 0);
