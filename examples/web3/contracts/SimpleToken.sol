// SPDX-License-Identifier: MIT
pragma solidity ^0.8.20;

/// Minimal ERC-20-style token for qdworker's web3 examples and tests.
/// Every transfer emits the standard `Transfer` plus QuickDapp's richer
/// `TokenTransferred`, which carries the token metadata so an indexer can
/// record it without extra calls.
contract SimpleToken {
    string public name;
    string public symbol;
    uint8 public immutable decimals;
    uint256 public totalSupply;

    mapping(address => uint256) public balanceOf;
    mapping(address => mapping(address => uint256)) public allowance;

    event Transfer(address indexed from, address indexed to, uint256 value);
    event Approval(address indexed owner, address indexed spender, uint256 value);
    event TokenTransferred(
        address indexed from,
        address indexed to,
        uint256 value,
        string name,
        string symbol,
        uint8 decimals
    );

    error InsufficientBalance(uint256 available, uint256 required);
    error InsufficientAllowance(uint256 available, uint256 required);
    error LengthMismatch();

    constructor(string memory name_, string memory symbol_, uint8 decimals_, uint256 initialSupply, address owner) {
        name = name_;
        symbol = symbol_;
        decimals = decimals_;
        totalSupply = initialSupply;
        balanceOf[owner] = initialSupply;
        emit Transfer(address(0), owner, initialSupply);
    }

    function transfer(address to, uint256 value) external returns (bool) {
        _move(msg.sender, to, value);
        return true;
    }

    function approve(address spender, uint256 value) external returns (bool) {
        allowance[msg.sender][spender] = value;
        emit Approval(msg.sender, spender, value);
        return true;
    }

    function transferFrom(address from, address to, uint256 value) external returns (bool) {
        uint256 allowed = allowance[from][msg.sender];
        if (allowed != type(uint256).max) {
            if (allowed < value) revert InsufficientAllowance(allowed, value);
            allowance[from][msg.sender] = allowed - value;
        }
        _move(from, to, value);
        return true;
    }

    /// Many transfers in one transaction (handy for generating lots of events).
    function batchTransfer(address[] calldata to, uint256[] calldata values) external returns (bool) {
        if (to.length != values.length) revert LengthMismatch();
        for (uint256 i = 0; i < to.length; i++) {
            _move(msg.sender, to[i], values[i]);
        }
        return true;
    }

    function _move(address from, address to, uint256 value) internal {
        uint256 bal = balanceOf[from];
        if (bal < value) revert InsufficientBalance(bal, value);
        unchecked {
            balanceOf[from] = bal - value;
        }
        balanceOf[to] += value;
        emit Transfer(from, to, value);
        emit TokenTransferred(from, to, value, name, symbol, decimals);
    }
}
