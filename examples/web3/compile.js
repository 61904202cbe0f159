#!/usr/bin/env node
// Compile examples/web3/contracts/*.sol with solc-js (standard JSON) and write
// examples/web3/artifacts.json: {contracts: {Name: {abi, bytecode, deployedBytecode}}}.
//
// Usage: node examples/web3/compile.js [--check]
//   solc is loaded from $QDWORKER_WEB3_TOOLS (default <root>/.tools/web3), as
//   installed by examples/web3/tools.sh. --check exits 1 if artifacts.json is stale.
'use strict';
const fs = require('fs');
const path = require('path');
const { createRequire } = require('module');

const here = __dirname;
const root = path.resolve(here, '..', '..');
const toolsDir = process.env.QDWORKER_WEB3_TOOLS || path.join(root, '.tools', 'web3');
const solc = createRequire(path.join(toolsDir, 'package.json'))('solc');

const EVM_VERSION = 'cancun';
const contractsDir = path.join(here, 'contracts');
const outFile = path.join(here, 'artifacts.json');

const sources = {};
for (const f of fs.readdirSync(contractsDir).filter((n) => n.endsWith('.sol')).sort()) {
  sources[f] = { content: fs.readFileSync(path.join(contractsDir, f), 'utf8') };
}

const input = {
  language: 'Solidity',
  sources,
  settings: {
    optimizer: { enabled: true, runs: 200 },
    evmVersion: EVM_VERSION,
    metadata: { bytecodeHash: 'none' },
    outputSelection: { '*': { '*': ['abi', 'evm.bytecode.object', 'evm.deployedBytecode.object'] } },
  },
};

const output = JSON.parse(solc.compile(JSON.stringify(input)));
const errors = (output.errors || []).filter((e) => e.severity === 'error');
for (const e of output.errors || []) console.error(e.formattedMessage);
if (errors.length) process.exit(1);

const contracts = {};
for (const file of Object.keys(output.contracts).sort()) {
  for (const name of Object.keys(output.contracts[file]).sort()) {
    const c = output.contracts[file][name];
    contracts[name] = {
      source: `contracts/${file}`,
      abi: c.abi,
      bytecode: '0x' + c.evm.bytecode.object,
      deployedBytecode: '0x' + c.evm.deployedBytecode.object,
    };
  }
}
const artifact = { compiler: `solc-js ${solc.version()}`, evmVersion: EVM_VERSION, contracts };
const text = JSON.stringify(artifact, null, 2) + '\n';

if (process.argv.includes('--check')) {
  const current = fs.existsSync(outFile) ? fs.readFileSync(outFile, 'utf8') : '';
  if (current !== text) {
    console.error('artifacts.json is out of date: run node examples/web3/compile.js');
    process.exit(1);
  }
  console.log('artifacts.json is up to date');
} else {
  fs.writeFileSync(outFile, text);
  console.log(`wrote ${path.relative(root, outFile)}: ${Object.keys(contracts).join(', ')}`);
}
