// SPDX-License-Identifier: MIT
pragma solidity ^0.8.20;

import {SimpleToken} from "./SimpleToken.sol";

/// Deploys SimpleToken instances and announces each one with QuickDapp's
/// `ERC20NewToken` event. The caller receives the whole initial supply.
contract TokenFactory {
    address[] public tokens;

    event ERC20NewToken(
        address indexed token,
        string name,
        string symbol,
        address indexed creator,
        uint256 initialSupply
    );

    function createToken(string calldata name, string calldata symbol, uint8 decimals, uint256 initialSupply)
        external
        returns (address token)
    {
        token = address(new SimpleToken(name, symbol, decimals, initialSupply, msg.sender));
        tokens.push(token);
        emit ERC20NewToken(token, name, symbol, msg.sender, initialSupply);
    }

    function numTokens() external view returns (uint256) {
        return tokens.length;
    }
}
